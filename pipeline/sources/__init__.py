"""Sources: turn a dataset on disk into a deterministic list of SourceItems."""

from __future__ import annotations

from schemas.config import SegmentConfig
from schemas.storage import is_dir

from pipeline.sources.base import SourceError, SourceItem, SourceListing


def list_source(config: SegmentConfig) -> SourceListing:
    """List the inputs of ``config.source`` under ``config.root`` (a folder or an s3:// prefix)."""
    root = config.root
    if config.source == "synthetic":
        from pipeline.sources import synthetic

        return synthetic.list_items(root, config.synthetic)
    if not is_dir(root):
        raise SourceError(f"{root}: source root is not a directory")
    if config.source == "cub":
        from pipeline.sources import cub

        return cub.list_items(root)
    if config.source == "imagefolder":
        from pipeline.sources import imagefolder

        return imagefolder.list_items(root)
    from pipeline.sources import listing

    assert config.listing is not None  # checked by SegmentConfig
    return listing.list_items(root, config.listing)


__all__ = ["SourceError", "SourceItem", "SourceListing", "list_source"]
