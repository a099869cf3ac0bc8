"""Fashion-MNIST softmax regression (Dive into Deep Learning §3.7) as an MLflow project."""

__version__ = "0.1.0"
