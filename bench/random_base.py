"""A base model folder with another model's shapes and tokenizer but random weights, for timing on a machine
the real weights cannot reach (timings do not depend on the weights; outputs do, so never compare text).

    python bench/random_base.py SRC DST     # SRC: a model folder (config.json + tokenizer files suffice)
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a model folder: its config.json and tokenizer are copied")
    ap.add_argument("dst", help="the folder to write (config, random weights, tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.src)).save_pretrained(args.dst)
    AutoTokenizer.from_pretrained(args.src).save_pretrained(args.dst)
    print(f"random_base: {args.dst} (shapes and tokenizer of {args.src}, random weights)")


if __name__ == "__main__":
    main()
