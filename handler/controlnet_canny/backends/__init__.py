"""What makes one kind of device fast, kept out of the model files (which are plain math named after the checkpoint)."""
