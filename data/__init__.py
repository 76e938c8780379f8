"""Data: dataset registry (packaged MNIST, image folders, tfds) and grain batch pipelines."""

from data.errors import DataError
from data.mnist import load_mnist
from data.pipeline import iterate_once, make_batches
from data.sources import ImageSource, get_source

__all__ = ['DataError', 'ImageSource', 'get_source', 'iterate_once', 'load_mnist', 'make_batches']
