"""retrain-uploader: keeps Prediction One models fresh by uploading the training data dropped into their inboxes."""

__version__ = "0.1.0"
__all__ = ["__version__"]
