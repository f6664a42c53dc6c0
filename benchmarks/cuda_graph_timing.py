"""Median time of a torch CUDA-graph replay: the timer the benchmark scripts share."""

import statistics

import torch


def time_graph(body, repeats=5, target_s=0.015, warmup=2):
    """Median seconds per replay of ``body`` captured in a CUDA graph.

    Args:
      body: callable issuing the CUDA work (its Python overhead is not timed).
      repeats: timed samples; the median is returned.
      target_s: each sample replays the graph enough times to last about this long.
      warmup: eager calls on a side stream before capture (lazy initialisation, autotuning).

    Returns:
      Seconds per replay.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    graph.replay()
    end.record()
    end.synchronize()
    reps = max(2, int(target_s * 1e3 / max(begin.elapsed_time(end), 1e-3)))
    samples = []
    for _ in range(repeats):
        begin.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(samples)
