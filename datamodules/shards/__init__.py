"""WebDataset shards: reader (decode, features, batching), writer, manifests."""
