"""The serving side: one frozen base model, many adapters per batch, behind a gRPC API."""
