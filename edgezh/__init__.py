"""edgezh: take a Llama 3 model to Chinese users on their own machines."""

__version__ = "0.1.0"
