from tpserve.distributed.parallel_state import TPGroup, DistEnv, init_distributed, destroy_distributed

__all__ = ["TPGroup", "DistEnv", "init_distributed", "destroy_distributed"]
