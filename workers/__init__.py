"""Worker processes: `python -m workers --role aggregated|prefill|decode --engine torch|mocker|trtllm ...`."""
