"""Format and code versions stamped into every output."""

from importlib.metadata import PackageNotFoundError, version

# Bump when the bytes of a shard, a manifest or a checkpoint change meaning.
FORMAT_VERSION = "3"  # 2: masks gzip-compressed (masks.npy.gz); 3: crop members optional (crop_size null)

try:
    CODE_VERSION = version("protomask")
except PackageNotFoundError:  # running from a source tree that is not installed
    CODE_VERSION = "0+unknown"
