"""The public tasks, thin functions over the engine: image in, PNG-ready image out with its parameters."""
