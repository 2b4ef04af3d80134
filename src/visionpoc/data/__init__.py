"""Data: dataset sources (Stanford Dogs, folders), the validation split, image decoding, loaders,
the download of the official archives, and the prepared store of the fast path."""
