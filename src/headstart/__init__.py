"""headstart: a folder of labelled photos to an image classifier, by transfer learning."""

__version__ = "0.1.0"
