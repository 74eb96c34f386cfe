"""Training the bundled model from scratch on the CPU: the corpus, the data and evaluation around a run, the
export in the released HF layout, and the training loop itself."""
