"""Python stubs generated from proto/adapterhub/v1/runtime.proto (regenerate: `python -m runtime.proto.build_stubs`)."""
