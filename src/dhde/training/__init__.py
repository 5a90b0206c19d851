"""Training the DHDE network on synthetically blurred sharp photos (ALGORITHM.md §6).

- :mod:`dhde.training.dataset`: labelled patches and features from sharp
  images (numpy only);
- :mod:`dhde.training.network`: the network as a torch module and its export
  to a dhde model file;
- :mod:`dhde.training.fit`: the training loop.

This package is imported only for training. ``dataset`` needs no more than
dhde's own dependencies; ``network`` and ``fit`` need torch (the ``train``
extra), so they are not imported here.
"""
