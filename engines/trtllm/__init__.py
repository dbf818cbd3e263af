"""TensorRT-LLM as an hpc engine: its LLM API (PyTorch backend) behind the Engine protocol. Its own cache
transceiver moves the KV between prefill and decode; hpc carries TensorRT-LLM's DisaggregatedParams opaquely."""
