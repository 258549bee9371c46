"""Model plumbing shared by every subpackage: batches, device, eval mode, fingerprint."""
