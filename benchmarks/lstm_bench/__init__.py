"""The code behind ``benchmarks/compare.py`` (FusedLSTM against torch.nn.LSTM), by part:

- ``workloads``: the LSTM sizes (packed variable-length ones too), dtypes and modes, one
  workload's weights and inputs, GEMM FLOPs;
- ``implementations``: what is compared (nn.LSTM, FusedLSTM, the floor, ONNX Runtime, haste,
  FlashRNN);
- ``ort``: ONNX Runtime as an inference peer (the nn.LSTM exported to ONNX);
- ``floor``: the framework floor, FusedLSTM's call structure without arithmetic;
- ``check``: outputs and gradients against a float64 nn.LSTM, before anything is timed;
- ``timing``: interleaved timing rounds and the peak memory of one call;
- ``gemm_peak``: the machine's best GEMM rate, and which kernel ran;
- ``ceilings``: the largest speedups the floor and the GEMM rate allow;
- ``grid``: what runs on which device and dtype, and the loop that measures it;
- ``machine``: the CPU (model, ISA), GPU, BLAS, versions and commit the numbers depend on, and
  the results folder's name;
- ``report``: the terminal's tables, results.json, results.md and speedup.png.

``compare.py`` holds the command line and puts this package's folder on ``sys.path``.
"""
