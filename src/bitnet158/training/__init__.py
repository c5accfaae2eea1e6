"""Training from scratch: the stdlib corpus and tokenizer, token files, and the QAT loop."""
