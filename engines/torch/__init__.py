"""The PyTorch reference engine: a Llama-family model over a paged KV cache with continuous batching."""
