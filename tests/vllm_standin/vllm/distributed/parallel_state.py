"""vllm.distributed.parallel_state: no process groups on CPU, so cleaning up only collects garbage."""

import gc


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    gc.collect()
