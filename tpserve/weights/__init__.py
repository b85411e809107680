from tpserve.weights.loader import CheckpointError, find_checkpoint_files, load_weights

__all__ = ["CheckpointError", "find_checkpoint_files", "load_weights"]
