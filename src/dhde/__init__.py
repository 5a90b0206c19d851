"""dhde: DHDE defocus estimation (Park, Tai, Cho, Kweon, CVPR 2017) in Python."""

__version__ = "0.1.0"
