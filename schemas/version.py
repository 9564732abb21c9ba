"""Format and code versions stamped into every output."""

from importlib.metadata import PackageNotFoundError, version

# Bump when the bytes of a shard, a manifest or a checkpoint change meaning.
FORMAT_VERSION = "6"  # 2: masks gzip-compressed (masks.npy.gz); 3: crop members optional (crop_size null);
# 4: inputs go to shards through a seeded permutation (shuffle_seed, in the manifest), a shard holds one split
# and its files are named by it (train-00000.tar, ...; ShardStats.split); 5: plan.parquet and job.json move into
# _job/, out of the way of dataset readers; 6: only the parquet files stay at the top (tars in _webdataset/, markers
# and config in _job/, manifest.json becomes _manifest.json), so the folder is one parquet dataset

try:
    CODE_VERSION = version("protomask")
except PackageNotFoundError:  # running from a source tree that is not installed
    CODE_VERSION = "0+unknown"
