"""Fine-tuning runs: data, the embedded default model and tokenizer, masked-LM warm-up and the training loop."""
