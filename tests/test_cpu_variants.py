"""Every CPU kernel variant, by name (csrc/cpu/plan.h), and the settings that choose them.

Each case names the variant and the product libraries it must run; the test asserts that
``fused_lstm.explain`` reports exactly those for the case (so a change of the rule cannot
silently move a case to another variant), then checks the call against nn.LSTM: forward,
inference and gradients, padded and packed. The settings (``fused_lstm.backends.cpu``) reach,
in this process, what this CPU would not pick by default: the BLAS where brgemm would run, the
generic cell pass where AVX-512 is, float32 products for bf16 models, the row-wise path where
the thin kernel would run.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm import FusedLSTM, ops, reference
from helpers import (
    allocation_sizes,
    assert_results_and_grads_close,
    call,
    cpu_features,
    differentiable,
    hidden_split_feature,
    isa_cap,
    isa_levels,
    lstm_pair,
    make_case,
    make_state,
    randn,
    random_lengths,
    zeros_state,
)

pytestmark = pytest.mark.filterwarnings(  # nn.LSTM's own, for the projection cases
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning")

CPU = fused_lstm.backends.cpu
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


FEATURES = cpu_features()
LSTM_FORWARD = torch.ops.fused_lstm.lstm_forward.default
LSTM_INFERENCE = torch.ops.fused_lstm.lstm_inference.default
needs = {
    "brgemm": pytest.mark.skipif(not FEATURES["brgemm"],
                                 reason="this torch's brgemm micro-kernel does not run here"),
    "avx512_bf16": pytest.mark.skipif(not FEATURES["avx512_bf16"],
                                      reason="the bf16 products need AVX512_BF16"),
    "avx512": pytest.mark.skipif(not FEATURES["avx512"], reason="the 16-lane cell pass needs "
                                 "AVX-512"),
    "amx_bf16": pytest.mark.skipif(not FEATURES["amx_bf16"], reason="the bf16 products on AMX "
                                   "tiles need AMX-BF16 (and oneDNN's brgemm for it)"),
    "onednn_matmul": pytest.mark.skipif(not FEATURES["onednn_matmul"],
                                        reason="this torch does not export oneDNN's matmul"),
}

# id: (settings, module kwargs, seq_len, batch, dtype, train, the plan's entries, CPU need)
# `train`: a training call (forward with a reserve, then backward) or inference (no_grad).
CASES = {
    "small_hidden-wide-bi": (
        {}, dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True), 9, 12, F64,
        True, {"variant": "small_hidden", "input_projection.0": "small-hidden product (inline)",
               "recurrent_product": "small-hidden product (inline)",
               "backward_dh_product": "small-hidden product (inline)",
               "backward_gates": "kept by the forward"}, None),
    # float16 training keeps no gates here (csrc/lstm.h gates_in_reserve): the small-hidden
    # backward recomputes each step's (small_hidden_backward.h, tiny_recompute_gates).
    "small_hidden-fp16-training-recomputes": (
        {}, dict(input_size=6, hidden_size=10, num_layers=2, bidirectional=True), 7, 9, F16,
        True, {"variant": "small_hidden",
               "backward_gates": "recomputed a step at a time (small-hidden kernel)"}, None),
    "small_hidden-narrow-proj": (
        {}, dict(input_size=40, hidden_size=9, proj_size=4, num_layers=2), 8, 3, F64, True,
        {"variant": "small_hidden", "input_projection.0": "blas",
         "input_projection.1": "small-hidden product (inline)"}, None),
    "small_hidden-inference": (
        {}, dict(input_size=6, hidden_size=12, num_layers=3), 11, 5, F32, False,
        {"variant": "small_hidden", "inference": True}, None),
    # Layers below the last hand their output on transposed (forward.h, tiny_out_t), over two
    # chunks of steps (2^20 gate elements each: 38 steps of 450 rows at hidden 15), both
    # directions.
    "small_hidden-inference-chunks-bi": (
        {}, dict(input_size=7, hidden_size=15, num_layers=3, bidirectional=True), 40, 450, F32,
        False, {"variant": "small_hidden", "inference": True}, None),
    "row_wise-brgemm-fused": (  # fused by the weights' size alone (not by measured rates)
        {"fuse_by_measured_rates": False}, dict(input_size=16, hidden_size=64, num_layers=2), 12,
        16, F32, True,
        {"variant": "row_wise", "input_projection.0": "brgemm, fused into the steps",
         "recurrent_product": "brgemm", "backward_dh_product": "brgemm"}, "brgemm"),
    "row_wise-brgemm-unfused": (
        {"allow_fused_input_projection": False},
        dict(input_size=16, hidden_size=64, num_layers=2, bidirectional=True), 12, 16, F32, True,
        {"variant": "row_wise", "input_projection.0": "blas", "recurrent_product": "brgemm"},
        "brgemm"),
    "row_wise-brgemm-inference-proj": (
        {}, dict(input_size=24, hidden_size=48, proj_size=20, num_layers=2), 10, 12, F32, False,
        {"variant": "row_wise", "recurrent_product": "brgemm", "inference": True}, "brgemm"),
    "row_wise-blas": (
        {"allow_brgemm": False}, dict(input_size=16, hidden_size=64, num_layers=2), 12, 16, F32,
        True, {"variant": "row_wise", "input_projection.0": "blas", "recurrent_product": "blas",
               "backward_dh_product": "blas"}, None),
    # Each product's library forced by name (gemm_library), whatever this machine's measured
    # rates would pick: every class of product (A B^T: input projection, recurrent product,
    # projection by W_hr; A^T B: weight gradients; A B: dL/dh, dL/dx) in each library.
    "row_wise-gemm-blas": (
        {"allow_brgemm": False, "gemm_library": "blas"},
        dict(input_size=16, hidden_size=64, num_layers=2, proj_size=24), 12, 16, F32, True,
        {"variant": "row_wise", "input_projection.0": "blas", "input_projection.1": "blas",
         "recurrent_product": "blas", "projection": "blas", "backward_dh_product": "blas",
         "backward_weight_products": "blas", "backward_data_product": "blas"}, None),
    "row_wise-gemm-onednn": (
        {"allow_brgemm": False, "gemm_library": "onednn_matmul"},
        dict(input_size=16, hidden_size=64, num_layers=2, proj_size=24), 12, 16, F32, True,
        {"variant": "row_wise", "input_projection.0": "onednn_matmul",
         "input_projection.1": "onednn_matmul", "recurrent_product": "onednn_matmul",
         "projection": "onednn_matmul", "backward_dh_product": "onednn_matmul",
         "backward_weight_products": "onednn_matmul", "backward_data_product": "onednn_matmul"},
        "onednn_matmul"),
    "row_wise-brgemm-gemm-onednn": (
        {"gemm_library": "onednn_matmul", "allow_fused_input_projection": False},
        dict(input_size=16, hidden_size=64, num_layers=2, bidirectional=True), 12, 16, F32, True,
        {"variant": "row_wise", "input_projection.0": "onednn_matmul",
         "recurrent_product": "brgemm", "backward_dh_product": "brgemm",
         "backward_weight_products": "onednn_matmul", "backward_data_product": "onednn_matmul"},
        "brgemm"),
    # The backward's small products (at most 2^14 multiply-adds) on 16 AVX-512 lanes
    # (small_avx512): thin dW of the tutorial sizes' layers below 16 batch rows (wider batches
    # sum them a step at a time, below), bidirectional, packed (dW_hh from h_prev's segments),
    # widths of 1 to 5. The small-hidden kernel's dL/dx is an inline product a step at a time.
    "small_hidden-small-products": (
        {"allow_small_hidden_avx512": False}, dict(input_size=1, hidden_size=3, num_layers=2),
        8, 12, F32, True,
        {"variant": "small_hidden", "backward_weight_products": "small_avx512",
         "backward_data_product": "small-hidden product (inline)"}, "avx512"),
    "small_hidden-small-products-bi": (
        {"allow_small_hidden_avx512": False},
        dict(input_size=5, hidden_size=4, num_layers=2, bidirectional=True), 5, 19, F32, True, {"variant": "small_hidden", "backward_weight_products": "small_avx512",
               "backward_data_product": "small-hidden product (inline)"}, "avx512"),
    # The small-hidden kernel's weight and bias gradients a step at a time in 16-lane partial
    # sums (plan.h tiny_weight_lanes_fit: 16 batch rows or more, and rows enough that the sums
    # are fewer floats than the dgates they replace): seed-tiny's size; bidirectional with a
    # projection (a second direction's sums, h_{t-1} of out < hidden); float64; batches that are
    # not a multiple of 16 (the lanes' tail), packed (rows starting late, h0 for them).
    "small_hidden-step-weights": (
        {}, dict(input_size=1, hidden_size=3, num_layers=2), 4, 92, F32, True,
        {"variant": "small_hidden", "backward_weight_products": "small-hidden steps (16-lane sums)",
         "backward_data_product": "small-hidden product (inline)"}, None),
    "small_hidden-step-weights-bi-proj": (
        {}, dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True, proj_size=2),
        12, 21, F32, True,
        {"variant": "small_hidden", "backward_weight_products": "small-hidden steps (16-lane sums)"},
        None),
    # ... and, for batches the 16-lane sums' rule does not take (under 16 rows, or too few
    # rows for the sums' size: 19 x 5), float32 on AVX-512, along each step's rows straight
    # into the gradients (plan.h tiny_weight_rows): small's size; an input of 20 (two vectors
    # a row) with a projection, bidirectional; packed (rows starting late, h0 for them).
    "small_hidden-step-weights-rows": (
        {}, dict(input_size=5, hidden_size=10, num_layers=2), 3, 10, F32, True,
        {"variant": "small_hidden",
         "backward_weight_products": "small-hidden steps (along rows, avx512)"}, "avx512"),
    "small_hidden-step-weights-rows-wide-input": (
        {}, dict(input_size=20, hidden_size=6, num_layers=2, bidirectional=True, proj_size=4),
        5, 19, F32, True,
        {"variant": "small_hidden",
         "backward_weight_products": "small-hidden steps (along rows, avx512)"}, "avx512"),
    "small_hidden-step-weights-float64": (
        {}, dict(input_size=3, hidden_size=5, num_layers=1, bias=False), 20, 17, F64, True,
        {"variant": "small_hidden", "backward_weight_products": "small-hidden steps (16-lane sums)"},
        None),
    # The small-hidden kernel's AVX-512 variant (small_hidden_avx512.h: masked 16-lane
    # products, permute transposes) and the generic one it replaces where allowed: a batch
    # of 16 + 5 (a masked tail), bidirectional (the layer output's rows 2 x 3 floats apart, of
    # which each direction's transposes touch its own 3), a projection (W_hr's products);
    # tests/test_small_hidden_avx512.py checks that the two give the same bits.
    "small_hidden-avx512-kernels": (
        {}, dict(input_size=2, hidden_size=5, num_layers=2, bidirectional=True, proj_size=3),
        6, 21, F32, True,
        {"variant": "small_hidden",
         "small_hidden_kernels": "avx512 (masked 16-lane products, permute transposes)"},
        "avx512"),
    "small_hidden-generic-kernels": (
        {"allow_small_hidden_avx512": False},
        dict(input_size=2, hidden_size=5, num_layers=2, bidirectional=True, proj_size=3), 6, 21,
        F32, True,
        {"variant": "small_hidden", "small_hidden_kernels":
         "target_clones (16/8/4/2/1-lane products, gather transposes)"}, "avx512"),
    "row_wise-small-products": (  # 16 rows: every product of both layers at most 2^14
        {}, dict(input_size=3, hidden_size=16, num_layers=2), 2, 8, F32, True,
        {"variant": "row_wise", "backward_weight_products": "small_avx512",
         "backward_data_product": "small_avx512"}, "avx512"),
    "row_wise-small-and-blas-products": (  # layer 1's dW_ih (in 32) too large: the BLAS
        {}, dict(input_size=3, hidden_size=16, num_layers=2, bidirectional=True), 3, 9, F32,
        True, {"variant": "row_wise", "backward_weight_products": "small_avx512,blas",
               "backward_data_product": "small_avx512,blas"}, "avx512"),
    # Matrix-vector products of a one-feature input (dW_ih, dL/dx) computed inline
    # (inline_gemv: MKL's sgemv would open a parallel region) where the small products are
    # off (or the CPU has no AVX-512, or float64), or by the BLAS when forced.
    "small_hidden-inline-gemv": (
        {"allow_small_products": False, "allow_small_hidden_avx512": False},
        dict(input_size=1, hidden_size=3, num_layers=2), 8,
        12, F32, True, {"variant": "small_hidden",
                        "backward_weight_products": "inline_gemv,blas",
                        "backward_data_product": "small-hidden product (inline)"}, None),
    "small_hidden-inline-gemv-float64": (
        {}, dict(input_size=1, hidden_size=5, num_layers=2, bidirectional=True), 6, 7, F64,
        True, {"backward_weight_products": "inline_gemv,blas",
               "backward_data_product": "small-hidden product (inline)"}, None),
    "row_wise-inline-gemv": (  # 9+ rows, packed too: more than the few-row backward takes
        {"allow_small_products": False},
        dict(input_size=1, hidden_size=16, num_layers=2, bidirectional=True), 3, 9, F32,
        True, {"variant": "row_wise", "backward_weight_products": "inline_gemv,blas",
               "backward_data_product": "inline_gemv,blas"}, None),
    "small_hidden-gemv-blas": (
        {"gemm_library": "blas", "allow_small_hidden_avx512": False},
        dict(input_size=1, hidden_size=3, num_layers=2), 8, 12, F32,
        True, {"variant": "small_hidden", "backward_weight_products": "blas",
               "backward_data_product": "small-hidden product (inline)"}, None),
    "row_wise-brgemm-gemm-blas": (
        {"gemm_library": "blas", "allow_fused_input_projection": False},
        dict(input_size=16, hidden_size=64, num_layers=2, bidirectional=True), 12, 16, F32, True,
        {"variant": "row_wise", "input_projection.0": "blas", "recurrent_product": "brgemm",
         "backward_weight_products": "blas", "backward_data_product": "blas"}, "brgemm"),
    "row_wise-float64-gemm-onednn": (  # oneDNN's matmul serves float32 only
        {"gemm_library": "onednn_matmul"}, dict(input_size=10, hidden_size=20, num_layers=2),
        7, 5, F64, True, {"variant": "row_wise", "input_projection.0": "blas",
                          "recurrent_product": "blas", "backward_weight_products": "blas"},
        None),
    "row_wise-float64": (
        {}, dict(input_size=10, hidden_size=20, num_layers=2, bidirectional=True,
                 proj_size=6), 7, 5, F64, True,
        {"variant": "row_wise", "recurrent_product": "blas", "cell_pass":
         "vectorised loops (target_clones)"}, None),
    "row_wise-generic-cell": (
        {"allow_vec16_cell": False}, dict(input_size=12, hidden_size=40, num_layers=2), 9, 9,
        F32, True, {"variant": "row_wise", "cell_pass": "vectorised loops (target_clones)"},
        None),
    "row_wise-vec16-cell": (
        {}, dict(input_size=12, hidden_size=40, num_layers=2), 9, 9, F32, True,
        {"variant": "row_wise", "cell_pass": "avx512 (16 lanes)"}, "avx512"),
    "row_wise-bf16_gemm": (
        {"allow_amx": False},
        dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True), 10, 12, BF16,
        True, {"variant": "row_wise", "recurrent_product": "bf16_gemm", "keep_16bit": "true",
               "backward_dh_product": "bf16_gemm", "backward_weight_products": "bf16_gemm"},
        "avx512_bf16"),
    "row_wise-bf16_gemm-odd-input": (
        {}, dict(input_size=17, hidden_size=32, num_layers=2), 10, 12, BF16, True,
        {"variant": "row_wise", "recurrent_product": "bf16_gemm",
         "input_projection.0": "bf16_gemm, fused into the steps"}, "avx512_bf16"),
    "row_wise-amx": (
        {}, dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True), 10, 12, BF16,
        True, {"variant": "row_wise", "recurrent_product": "amx_brgemm", "keep_16bit": "true",
               "input_projection.0": "amx_brgemm, fused into the steps",
               "backward_dh_product": "amx_brgemm",
               "backward_weight_products": "amx_brgemm"}, "amx_bf16"),
    "row_wise-amx-odd-rows": (  # odd K in the weight gradients' packed x and h_prev
        {}, dict(input_size=24, hidden_size=32, num_layers=1, bidirectional=True), 7, 13, BF16,
        True, {"variant": "row_wise", "backward_weight_products": "amx_brgemm"}, "amx_bf16"),
    "row_wise-amx-step-wider-than-a-chunk": (  # a step's 1030 rows > kBf16GradRows
        {}, dict(input_size=8, hidden_size=16, num_layers=1), 3, 1030, BF16, True,
        {"variant": "row_wise", "backward_dh_product": "amx_brgemm",
         "backward_weight_products": "amx_brgemm"}, "amx_bf16"),
    "row_wise-amx-unfused-inference": (
        {"allow_fused_input_projection": False},
        dict(input_size=24, hidden_size=48, num_layers=2, proj_size=20), 10, 12, BF16, False,
        {"variant": "row_wise", "input_projection.0": "amx_brgemm",
         "recurrent_product": "amx_brgemm"}, "amx_bf16"),
    # A bf16 model's fused step on AMX tiles only up to kAmxFuseWeightBytesPerRow (64 KB) of
    # fused bf16 weights per slice row (plan.h): 1 MB of weights over slices of 6 rows is
    # unfused on the tiles and fused on bf16_gemm (kFuseWeightBytesPerRow, 256 KB per row).
    "row_wise-amx-unfused-by-size": (
        {}, dict(input_size=256, hidden_size=256, num_layers=1), 3, 12, BF16, True,
        {"variant": "row_wise", "input_projection.0": "amx_brgemm",
         "recurrent_product": "amx_brgemm"}, "amx_bf16"),
    "row_wise-bf16_gemm-fused-by-size": (
        {"allow_amx": False}, dict(input_size=256, hidden_size=256, num_layers=1), 3, 12, BF16,
        False, {"variant": "row_wise", "input_projection.0": "bf16_gemm, fused into the steps",
                "recurrent_product": "bf16_gemm"}, "avx512_bf16"),
    "row_wise-bf16_gemm-unfused": (
        {"allow_fused_input_projection": False, "allow_amx": False},
        dict(input_size=24, hidden_size=32, num_layers=2, proj_size=12), 10, 12, BF16, True,
        {"variant": "row_wise", "input_projection.0": "bf16_gemm",
         "recurrent_product": "bf16_gemm"}, "avx512_bf16"),
    "row_wise-bf16-float32-products": (
        {"allow_bf16_products": False},
        dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True), 10, 12, BF16,
        True, {"variant": "row_wise", "keep_16bit": "false", "backward_dh_product": "brgemm"},
        "brgemm"),
    "thin-one-step": (
        {}, dict(input_size=64, hidden_size=48, num_layers=2, bidirectional=True), 1, 3, F32,
        False, {"variant": "thin", "recurrent_product": "thin kernel (dot products)"}, None),
    "thin-bf16-one-step": (
        {}, dict(input_size=64, hidden_size=48, num_layers=2, bidirectional=True), 1, 3, BF16,
        False, {"variant": "thin", "keep_16bit": "true", "recurrent_product":
                "thin kernel (dot products, bf16 weights widened to float32)"}, None),
    "thin-fp16-one-step": (
        {}, dict(input_size=64, hidden_size=48, num_layers=2, bidirectional=True), 1, 3, F16,
        False, {"variant": "thin", "keep_16bit": "true", "recurrent_product":
                "thin kernel (dot products, fp16 weights widened to float32)"}, None),
    # float16 training whose reserve keeps the gates: the forward keeps W_ih and W_hh and packs
    # brgemm's panels from them (CpuPlan::fp16_kept_weights), the backward widens them a layer
    # and direction at a time, and W_ih's and W_hh's gradients are made apart from 9 rows
    # (CpuPlan::weight_grads_apart: 15 rows here; one step of 12 below).
    "fp16-training-widens": (
        {}, dict(input_size=24, hidden_size=40, num_layers=2), 5, 3, F16, True,
        {"variant": "row_wise", "keep_16bit": "true", "fp16_kept_weights": "true",
         "backward_widens_16bit": "true", "weight_grads_apart": "true"}, "brgemm"),
    # One step of 9 to 32 rows: the thin kernel's forward on the float16 weights as stored (gates
    # and c_t into the reserve), the general backward; from 33 rows the row-wise forward.
    "fp16-training-one-step-thin": (
        {}, dict(input_size=24, hidden_size=40, num_layers=2, bidirectional=True), 1, 12, F16,
        True, {"variant": "thin", "keep_16bit": "true", "weight_grads_apart": "true",
               "backward_gates": "kept by the forward"}, None),
    "fp16-training-one-step": (
        {}, dict(input_size=24, hidden_size=40, num_layers=2, bidirectional=True), 1, 40, F16,
        True, {"variant": "row_wise", "fp16_kept_weights": "true", "recurrent_product": "brgemm",
               "weight_grads_apart": "true"}, "brgemm"),
    "fp16-training-widens-bi-proj-no-brgemm": (
        {"allow_brgemm": False, "allow_small_products": False}, dict(input_size=20, hidden_size=32, num_layers=2,
                                      bidirectional=True, proj_size=12), 6, 4, F16, True,
        {"variant": "row_wise", "keep_16bit": "false", "fp16_kept_weights": "false",
         "backward_widens_16bit": "true", "backward_dh_product": "blas"}, None),
    # float16 training whose reserve keeps no gates (csrc/lstm.h gates_in_reserve): the forward
    # keeps the input, W_ih and W_hh and projects by chunks of steps, the backward recomputes
    # the gates a chunk at a time (CpuPlan::fp16_kept_training; three chunks at these sizes).
    "fp16-training-no-gates": (
        {}, dict(input_size=24, hidden_size=64, num_layers=2), 150, 32, F16, True,
        {"variant": "row_wise", "keep_16bit": "true", "fp16_kept_training": "true",
         "backward_widens_16bit": "true", "backward_dh_product": "brgemm",
         "backward_gates": "recomputed by chunks of steps"}, "brgemm"),
    "fp16-training-no-gates-bi-proj-unfused": (  # (the BLAS named: by measured rates a loaded
        # host can pick oneDNN's matmul for this projection)
        {"allow_fused_input_projection": False, "gemm_library": "blas"},
        dict(input_size=24, hidden_size=256, num_layers=2, bidirectional=True, proj_size=40), 70,
        16, F16, True, {"variant": "row_wise", "fp16_kept_training": "true",
                        "input_projection.0": "blas"}, "brgemm"),
    "fp16-training-no-gates-one-step": (  # one step of a large batch packs too (plan.h packs)
        {}, dict(input_size=24, hidden_size=64, num_layers=2), 1, 600, F16, True,
        {"variant": "row_wise", "fp16_kept_training": "true", "recurrent_product": "brgemm",
         "backward_gates": "recomputed by chunks of steps"}, "brgemm"),
    "fp16-training-no-gates-no-brgemm": (  # library steps: recomputed step by step
        {"allow_brgemm": False, "allow_small_products": False},
        dict(input_size=24, hidden_size=64, num_layers=2, bidirectional=True), 150, 32, F16,
        True, {"variant": "row_wise", "fp16_kept_training": "false",
               "backward_widens_16bit": "true", "backward_dh_product": "blas"}, None),
    # Training calls of at most 8 rows in all (B x T): the backward's products read W_ih and
    # W_hh as stored, 16-bit ones widened in registers, the weight gradients as summed outer
    # products (few_rows.h); odd sizes for the column tails.
    "few-rows-float32": (  # the row-wise forward (thin off)
        {"allow_thin": False}, dict(input_size=37, hidden_size=35, num_layers=2), 1, 5, F32,
        True, {"variant": "row_wise", "backward_dh_product": "few_rows (weights as stored)",
         "backward_weight_products": "few_rows (outer products)",
         "backward_data_product": "few_rows (weights as stored)"}, None),
    "few-rows-fp16-bi-proj": (
        {}, dict(input_size=20, hidden_size=32, num_layers=2, bidirectional=True, proj_size=12),
        2, 4, F16, True,
        {"variant": "row_wise", "backward_widens_16bit": "true",
         "backward_dh_product": "few_rows (weights as stored)"}, None),
    "few-rows-bf16": (  # thin forward (padded; packed bf16 keeps no gates: row-wise)
        {}, dict(input_size=70, hidden_size=66, num_layers=3), 1, 8, BF16, True,
        {"backward_dh_product": "few_rows (weights as stored)",
         "backward_data_product": "few_rows (weights as stored)"}, None),
    "few-rows-off": (
        {"allow_few_rows": False}, dict(input_size=37, hidden_size=35, num_layers=2), 1, 5, F32,
        True, {"variant": "row_wise", "backward_weight_products": "blas"}, None),
    # float16 inference on the row-wise path: the input, W_ih and W_hh read as given with
    # brgemm's steps (CpuPlan::fp16_kept_inference), widened at the op's boundary without; the
    # output written in float16 by the steps either way (CpuPlan::output_16bit).
    "fp16-inference-row-wise": (
        {}, dict(input_size=20, hidden_size=32, num_layers=2, bidirectional=True), 12, 16, F16,
        False, {"variant": "row_wise", "keep_16bit": "true", "output_16bit": "true",
                "recurrent_product": "brgemm"}, "brgemm"),
    "fp16-inference-row-wise-unfused": (
        {"allow_fused_input_projection": False},
        dict(input_size=20, hidden_size=32, num_layers=2, proj_size=12), 12, 16, F16, False,
        {"variant": "row_wise", "keep_16bit": "true", "input_projection.0": "blas"}, "brgemm"),
    "fp16-inference-row-wise-no-brgemm": (
        {"allow_brgemm": False}, dict(input_size=20, hidden_size=32, num_layers=2,
                                      bidirectional=True), 12, 16, F16, False,
        {"variant": "row_wise", "keep_16bit": "false", "output_16bit": "true"}, None),
    "thin-bf16-steps": (
        {}, dict(input_size=40, hidden_size=33, num_layers=2), 3, 4, BF16, False,
        {"variant": "thin", "keep_16bit": "true"}, None),
    # A bfloat16 model's steps on AMX tiles: the thin kernel up to 32 rows in all (steps x
    # batch), the row-wise path beyond (plan.h kThinAmxMaxRows; packed: at least 39 rows).
    "thin-bf16-amx-32-rows": (
        {}, dict(input_size=64, hidden_size=64, num_layers=2), 4, 8, BF16, False,
        {"variant": "thin"}, None),
    "row_wise-bf16-amx-beyond-thin": (
        {}, dict(input_size=64, hidden_size=64, num_layers=2), 32, 8, BF16, False,
        {"variant": "row_wise", "recurrent_product": "amx_brgemm",
         "why": "hidden_size >= 16; a bfloat16 model's steps of more than 32 rows in all run "
                "faster on AMX tiles than in the thin kernel"}, "amx_bf16"),
    "thin-steps": (
        {}, dict(input_size=40, hidden_size=32, num_layers=3), 20, 8, F64, False,
        {"variant": "thin"}, None),
    "thin-off": (
        {"allow_thin": False}, dict(input_size=40, hidden_size=32, num_layers=3), 20, 8, F64,
        False, {"variant": "row_wise", "why": "hidden_size >= 16; the thin kernel is off "
                "(allow_thin)"}, None),
    "thin-sizes-training": (  # 9 rows (24 padded)
        {}, dict(input_size=64, hidden_size=48, num_layers=1), 3, 8, F32, True,
        {"variant": "row_wise", "why": "hidden_size >= 16; the thin kernel trains only calls "
                                       "of at most 8 rows"}, None),
    # Training of at most 8 rows in all, no projection: the thin kernel's forward (gates and c_t
    # into the reserve) and the few-row backward; 16-bit weights read as given in both.
    "thin-training": (
        {}, dict(input_size=64, hidden_size=48, num_layers=2, bidirectional=True), 2, 3, F32,
        True, {"variant": "thin", "keep_16bit": "false",
               "backward_dh_product": "few_rows (weights as stored)"}, None),
    "thin-training-fp16": (
        {}, dict(input_size=30, hidden_size=70, num_layers=3), 1, 7, F16, True,
        {"variant": "thin", "keep_16bit": "true", "backward_widens_16bit": "true",
         "backward_dh_product": "few_rows (weights as stored)"}, None),
}
# Float tolerances of the comparison with float64 (see check_against_nn_lstm).
FLOOR = {F64: 1e-10, F32: 2e-6, BF16: torch.finfo(BF16).eps, F16: torch.finfo(F16).eps}


def assert_within_twice_nn_lstm(ours, expected, theirs, floor):
    """Each of our results within twice nn.LSTM's distance to the float64 reference, plus
    `floor` times the result's scale (gradients can exceed 1: the floor is relative to them)."""
    for i, (o, e, t) in enumerate(zip(ours, expected, theirs)):
        assert not torch.isnan(o).any(), i
        scale = max(1.0, e.abs().max().item())
        our_error = (o.double() - e).abs().max().item()
        their_error = (t.double() - e).abs().max().item()
        assert our_error <= 2 * their_error + floor * scale, (i, our_error, their_error)


def case_params():
    for name, case in CASES.items():
        need = case[-1]
        yield pytest.param(name, marks=[needs[need]] if need else [], id=name)


def _inputs(module, seq_len, batch, packed, dtype):
    x = randn(seq_len, batch, module.input_size).to(dtype)
    layers_dirs = module.num_layers * (2 if module.bidirectional else 1)
    out = module.proj_size or module.hidden_size
    hx = (randn(layers_dirs, batch, out).to(dtype),
          randn(layers_dirs, batch, module.hidden_size).to(dtype))
    lengths = random_lengths(batch, seq_len, sort=True) if packed else None
    return x, hx, lengths


def _run(module, x, hx, lengths, upstream, train):
    """Outputs (and with `train`, the gradients of input, h0, c0 and every weight), float64.
    hx None: the module called without a state (no h0, c0 gradients)."""
    leaves = [x.clone().requires_grad_(train),
              *(t.clone().requires_grad_(train) for t in hx or ())]
    inp = pack_padded_sequence(leaves[0], lengths) if lengths else leaves[0]
    with torch.set_grad_enabled(train):
        out, (h_n, c_n) = module(inp, tuple(leaves[1:]) if hx else None)
    out = out.data if lengths else out
    results = [out, h_n, c_n]
    if train:
        results += torch.autograd.grad([out, h_n, c_n], leaves + list(module.parameters()),
                                       [u.to(t.dtype) for u, t in zip(upstream, results)])
    return [t.detach().double() for t in results]


def check_against_nn_lstm(kwargs, seq_len, batch, dtype, train, packed):
    """FusedLSTM in `dtype` against nn.LSTM in float64 on the same (rounded) weights and inputs:
    within twice nn.LSTM's own error in `dtype`, plus FLOOR relative to the values (float64:
    within FLOOR of nn.LSTM)."""
    torch_lstm = nn.LSTM(dtype=dtype, **kwargs)
    fused = FusedLSTM(dtype=dtype, **kwargs)
    fused.load_state_dict(torch_lstm.state_dict())
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict({k: v.double() for k, v in torch_lstm.state_dict().items()})
    x, hx, lengths = _inputs(fused, seq_len, batch, packed, dtype)
    rows = sum(lengths) if lengths else seq_len * batch
    d_out = (2 if kwargs.get("bidirectional") else 1) * (kwargs.get("proj_size") or
                                                         kwargs["hidden_size"])
    upstream = (randn(*((rows, d_out) if lengths else (seq_len, batch, d_out))),
                randn(*hx[0].shape), randn(*hx[1].shape))
    ours = _run(fused, x, hx, lengths, upstream, train)
    expected = _run(exact, x.double(), tuple(t.double() for t in hx), lengths, upstream, train)
    theirs = _run(torch_lstm, x, hx, lengths, upstream, train) if dtype != F64 else expected
    assert len(ours) == len(expected) == len(theirs)
    assert_within_twice_nn_lstm(ours, expected, theirs, FLOOR[dtype])
    return fused, x, lengths


@needs["amx_bf16"]
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_amx_fused_step_without_hx(train):
    """A bf16 model's fused step on AMX tiles at the first step without hx: no h_{t-1}, so the one
    call per panel takes x_t's columns of the packed [W_ih^T; W_hh^T] only (amx.h,
    amx_cat_rows). Against nn.LSTM in float64 on the same bf16 values, within twice nn.LSTM's own
    bf16 error (layer 0 reads the bf16 input as given, layer 1 the float layer output)."""
    kwargs = dict(input_size=24, hidden_size=32, num_layers=2)
    torch_lstm = nn.LSTM(dtype=BF16, **kwargs)
    fused = FusedLSTM(dtype=BF16, **kwargs)
    fused.load_state_dict(torch_lstm.state_dict())
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict({k: v.double() for k, v in torch_lstm.state_dict().items()})
    x = randn(6, 12, 24).to(BF16)
    upstream = (randn(6, 12, 32), randn(2, 12, 32), randn(2, 12, 32))
    plan = plan_of(fused, x, None, train)
    assert plan["recurrent_product"] == "amx_brgemm"
    assert plan["input_projection.0"] == "amx_brgemm, fused into the steps"
    assert_within_twice_nn_lstm(_run(fused, x, None, None, upstream, train),
                                _run(exact, x.double(), None, None, upstream, train),
                                _run(torch_lstm, x, None, None, upstream, train), FLOOR[BF16])


def plan_of(module, x, lengths, train):
    inp = pack_padded_sequence(x, lengths) if lengths else x
    with torch.set_grad_enabled(train):
        return fused_lstm.explain(module, inp)["forward"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(case_params()))
def test_variant(name, packed):
    settings, kwargs, seq_len, batch, dtype, train, expected, _ = CASES[name]
    with CPU.flags(**settings):
        module = FusedLSTM(dtype=dtype, **kwargs)
        x, _, lengths = _inputs(module, seq_len, batch, packed, dtype)
        plan = plan_of(module, x, lengths, train)
        assert plan["inference"] is not train
        for key, value in expected.items():
            assert plan[key] == value, (key, plan)
        check_against_nn_lstm(kwargs, seq_len, batch, dtype, train, packed)


@pytest.mark.parametrize("setting,case,key,bits_differ", [
    ("allow_brgemm", "row_wise-brgemm-fused", "recurrent_product", False),
    ("allow_fused_input_projection", "row_wise-brgemm-fused", "input_projection.0", False),
    ("allow_vec16_cell", "row_wise-vec16-cell", "cell_pass", True),
    ("allow_thin", "thin-one-step", "variant", True),
    ("allow_bf16_products", "row_wise-bf16_gemm", "recurrent_product", True),
    ("allow_amx", "row_wise-amx", "recurrent_product", False),
    ("allow_few_rows", "few-rows-float32", "backward_dh_product", False),
    ("allow_weight_grads_apart", "few-rows-float32", "weight_grads_apart", False),
    ("allow_weight_grads_apart", "fp16-training-widens", "weight_grads_apart", False),
    ("allow_small_products", "small_hidden-small-products", "backward_weight_products", True),
    ("allow_small_hidden_avx512", "small_hidden-avx512-kernels", "small_hidden_kernels", False),
    ("allow_small_hidden_avx512", "small_hidden-step-weights-rows", "backward_weight_products",
     True),
])
def test_setting_switches_the_kernel(setting, case, key, bits_differ):
    """Turning a setting off changes the plan the kernels read (explain), and both plans agree
    with each other closely. Where the two compute differently on every CPU (another exp, other
    summation orders, bf16 rounding), the results also differ in bits: the switch did reach the
    kernel. (brgemm and MKL's sgemm, fused or not, sum in the same order on some CPUs; so do
    AMX tiles and AVX512_BF16's dot products: pairs of bf16 products added in K's order; and
    the few-row products and MKL's at small sizes, both one fused multiply-add per term in K's
    order.)"""
    need = CASES[case][-1]
    if need and not FEATURES[need]:
        pytest.skip(f"this CPU lacks {need}")
    settings, kwargs, seq_len, batch, dtype, train, _, _ = CASES[case]
    module = FusedLSTM(dtype=dtype, **kwargs)
    x, hx, lengths = _inputs(module, seq_len, batch, False, dtype)
    upstream = [randn(*t.shape) for t in (module(x, hx)[0], *hx)]
    with CPU.flags(**settings):
        default = _run(module, x, hx, lengths, upstream, train)
        default_plan = plan_of(module, x, lengths, train)
    with CPU.flags(**{**settings, setting: False}):
        switched = _run(module, x, hx, lengths, upstream, train)
        switched_plan = plan_of(module, x, lengths, train)
    assert switched_plan[key] != default_plan[key], (key, default_plan[key])
    if bits_differ:
        assert any(not torch.equal(a, b) for a, b in zip(default, switched))
    # (float16: the same float32 sums in another order, rounded once, differ by at most one
    # unit in the last place, 2^-10 of the value.)
    tol = 0.05 if dtype == BF16 else 1e-5
    for a, b in zip(default, switched):
        torch.testing.assert_close(a, b, rtol=2**-10 if dtype == F16 else tol, atol=tol)
    with CPU.flags(**settings):
        again = _run(module, x, hx, lengths, upstream, train)
    assert all(a.equal(b) for a, b in zip(default, again))


def _library_rates(plan, key="library_rates"):
    """explain's library_rates (or `key`): {class: (blas, onednn_matmul)} in GFLOP/s."""
    text = plan[key].split(" (")[0]
    rates = {}
    for part in text.split("; "):
        cls, _, blas, _, onednn = part.split()
        rates[cls] = (int(blas), int(onednn))
    return rates


def test_measured_rates_choose_library_and_fusion():
    """By default (gemm_library "auto", fuse_by_measured_rates) the plan follows the rates this
    process measured, as explain reports them: a large float32 product goes to oneDNN's matmul
    exactly where its measured rate for that class of product beats the BLAS's, and the input
    projection is fused into the steps exactly where the fused step measured at most 5% slower
    than the recurrent step alone plus the projection at the GEMM rate. Whatever this machine
    picks, the call matches nn.LSTM (test_variant forces each choice by name)."""
    kwargs = dict(input_size=128, hidden_size=256, num_layers=2)
    module = FusedLSTM(dtype=F32, **kwargs)
    x, _, _ = _inputs(module, 20, 32, False, F32)
    with num_threads(1):
        plan = plan_of(module, x, None, True)
        rates = _library_rates(plan)
        assert set(rates) == {"A*B^T", "A^T*B", "A*B"}
        assert all(blas > 0 for blas, _ in rates.values())

        def expected(cls):
            blas, onednn = rates[cls]
            return "onednn_matmul" if FEATURES["onednn_matmul"] and onednn > blas else "blas"
        # [rows, in] x [in, 4H], [4H, rows] x [rows, in], [rows, 4H] x [4H, in]: all >= 2^22
        # multiply-adds. (Rates are reported rounded: a near tie is not checked.)
        if abs(rates["A^T*B"][0] - rates["A^T*B"][1]) > 1:
            assert plan["backward_weight_products"] == expected("A^T*B")
        if abs(rates["A*B"][0] - rates["A*B"][1]) > 1:
            assert plan["backward_data_product"] == expected("A*B")
        if FEATURES["brgemm"]:
            for layer in range(2):
                fused_us, unfused_us = (float(w) for w in re.findall(
                    r"fused ([0-9.e+]+) us, unfused ([0-9.e+]+) us",
                    plan[f"fused_step_rates.{layer}"])[0])
                fused = plan[f"input_projection.{layer}"] == "brgemm, fused into the steps"
                bound = 1.05 * unfused_us  # plan.h's kUnfusedMustWinBy
                if abs(fused_us - bound) > 1e-3 * bound:  # printed to 6 digits
                    assert fused == (fused_us <= bound), plan
                if not fused and abs(rates["A*B^T"][0] - rates["A*B^T"][1]) > 1:
                    assert plan[f"input_projection.{layer}"] == expected("A*B^T")
            with CPU.flags(fuse_by_measured_rates=False):  # by the weights' size alone
                by_size = plan_of(module, x, None, True)
            assert "fused_step_rates.0" not in by_size
            assert by_size["input_projection.0"] == "brgemm, fused into the steps"
        check_against_nn_lstm(kwargs, 20, 32, F32, True, False)


@pytest.mark.skipif(not FEATURES["brgemm"], reason="the fused step's rates need brgemm")
def test_fused_step_rates_report_the_unfused_pair_in_its_two_parts():
    """fused_step_rates.<layer> gives the unfused pair as the recurrent step alone plus the
    rows' share of the projection (plan.h fused_step_rates; rates.h step_pair_seconds, which
    times the three together), each measured, and the share grows with the layer's input
    (layer 1's 256 inputs against layer 0's 128). The figures are measured once per process
    and shape: a second call reports the same ones."""
    module = FusedLSTM(128, 256, 2, dtype=F32)
    x, _, _ = _inputs(module, 20, 32, False, F32)
    pattern = (r"fused ([0-9.e+]+) us, unfused ([0-9.e+]+) us \(one thread's step: recurrent "
               r"([0-9.e+]+) us \+ projection ([0-9.e+]+) us; measured together in \d+ ms\)")
    with num_threads(1):
        plan = plan_of(module, x, None, True)
        again = plan_of(module, x, None, True)
    parts = {}
    for layer in range(2):
        line = plan[f"fused_step_rates.{layer}"]
        assert again[f"fused_step_rates.{layer}"] == line
        match = re.fullmatch(pattern, line)
        assert match, line
        fused_us, unfused_us, recurrent_us, projection_us = (float(v) for v in match.groups())
        assert min(fused_us, recurrent_us, projection_us) > 0, line
        # Printed to 6 significant digits.
        assert unfused_us == pytest.approx(recurrent_us + projection_us, rel=1e-5), line
        parts[layer] = projection_us
    assert parts[1] > parts[0], plan


def test_products_on_every_thread_follow_the_rates_on_that_many_threads(two_threads):
    """A large product outside the steps' parallel region (the unfused input projection, the
    backward's weight and data products) runs on every thread, and goes to the library whose
    rate measured on the process's thread count is the higher (explain's
    library_rates_threads), not one thread's (library_rates): on the Intel Xeon the two ranked
    differently from process to process (benchmarks/notes/float32-bound.md, "The library on
    all threads"). One thread has no such line and follows one thread's rates (the test above)."""
    kwargs = dict(input_size=128, hidden_size=256, num_layers=2)
    module = FusedLSTM(dtype=F32, **kwargs)
    x, _, _ = _inputs(module, 20, 32, False, F32)
    with CPU.flags(allow_fused_input_projection=False):
        plan = plan_of(module, x, None, True)
    assert plan["library_rates_threads"].endswith("2 threads; measured in "
                                                  + plan["library_rates_threads"].split()[-2]
                                                  + " ms)")
    rates = _library_rates(plan, "library_rates_threads")
    assert set(rates) == {"A*B^T", "A^T*B", "A*B"}
    assert all(blas > 0 for blas, _ in rates.values())

    def check(cls, chosen):
        blas, onednn = rates[cls]
        if abs(blas - onednn) > 1:  # (rates are reported rounded: a near tie is not checked)
            assert chosen == ("onednn_matmul" if FEATURES["onednn_matmul"] and onednn > blas
                              else "blas"), (cls, chosen, plan)
    check("A^T*B", plan["backward_weight_products"])
    check("A*B", plan["backward_data_product"])
    for layer in range(2):
        check("A*B^T", plan[f"input_projection.{layer}"])
    with num_threads(1):
        assert "library_rates_threads" not in plan_of(module, x, None, True)
    with CPU.flags(allow_fused_input_projection=False):
        check_against_nn_lstm(kwargs, 20, 32, F32, True, False)


@pytest.mark.skipif(not FEATURES["onednn_matmul"], reason="oneDNN's matmul is not available")
def test_products_on_every_thread_take_the_library_recorded_faster(two_threads):
    """The same rule, each way, from rates recorded by the test hook for 2 threads (whatever
    this machine measures): every class to oneDNN's matmul, then every class to the BLAS, then
    one class each way; one thread's rates no longer decide those products."""
    kwargs = dict(input_size=128, hidden_size=256, num_layers=2)
    module = FusedLSTM(dtype=F32, **kwargs)
    x, _, _ = _inputs(module, 20, 32, False, F32)
    record = torch.ops.fused_lstm._library_rates_record
    try:
        for blas, onednn in (([100.0] * 3, [200.0] * 3), ([200.0] * 3, [100.0] * 3),
                             ([100.0, 200.0, 100.0], [200.0, 100.0, 200.0])):
            record(2, blas, onednn)
            with CPU.flags(allow_fused_input_projection=False):
                plan = plan_of(module, x, None, True)
            assert plan["library_rates_threads"].startswith(
                f"A*B^T blas {int(blas[0])} onednn_matmul {int(onednn[0])}")

            def faster(cls):
                return "onednn_matmul" if onednn[cls] > blas[cls] else "blas"
            assert plan["input_projection.0"] == plan["input_projection.1"] == faster(0), plan
            assert plan["backward_weight_products"] == faster(1), plan
            assert plan["backward_data_product"] == faster(2), plan
            with CPU.flags(allow_fused_input_projection=False):
                check_against_nn_lstm(kwargs, 20, 32, F32, True, False)
    finally:
        torch.ops.fused_lstm._library_rates_forget()


def test_flags_restore_every_setting_even_after_an_error():
    before = CPU.as_dict()
    with pytest.raises(KeyError):
        with CPU.flags(allow_thin=False, allow_brgemm=False):
            assert not CPU.allow_thin and not CPU.allow_brgemm
            raise KeyError("inside")
    assert CPU.as_dict() == before


def test_settings_reject_unknown_names_and_bad_values():
    with pytest.raises(AttributeError, match="no setting 'allow_everything'"):
        CPU.allow_everything = True
    with pytest.raises(AttributeError, match="no setting"):
        with CPU.flags(allow_thinn=False):
            pass
    with pytest.raises(TypeError, match="takes a bool"):
        CPU.allow_thin = 0
    with pytest.raises(ValueError, match="'auto', 'blas' or 'onednn_matmul'; got 'mkl'"):
        CPU.gemm_library = "mkl"
    assert CPU.gemm_library == "auto"
    with CPU.flags(gemm_library="onednn_matmul"):
        assert CPU.gemm_library == "onednn_matmul"
    assert CPU.gemm_library == "auto"
    cuda = fused_lstm.backends.cuda
    with pytest.raises(ValueError, match="'auto', 'persistent' or 'step'"):
        cuda.path = "fast"
    with pytest.raises(ValueError, match="power of two"):
        cuda.persistent_k_split = 3
    with pytest.raises(ValueError, match=r"\[1, 64\]"):
        cuda.persistent_tile = 65
    assert CPU.allow_thin is True and cuda.path == "auto"
    with cuda.flags(path="step", persistent_units=4):
        assert (cuda.path, cuda.persistent_units) == ("step", 4)
    assert (cuda.path, cuda.persistent_units) == ("auto", None)


def test_a_setting_applies_from_the_next_call():
    module = FusedLSTM(64, 48)
    x = randn(1, 2, 64, dtype=F32)
    with torch.no_grad():
        assert fused_lstm.explain(module, x)["path"] == "thin"
        CPU.allow_thin = False
        try:
            assert fused_lstm.explain(module, x)["path"] == "row_wise"
        finally:
            CPU.allow_thin = True
        assert fused_lstm.explain(module, x)["path"] == "thin"


def test_environment_gives_the_defaults_at_import(tmp_path):
    """The environment variables are read once, at import, as the settings' defaults (a fresh
    process is what this test is about); an invalid value is refused with its name."""
    env = dict(os.environ, FUSED_LSTM_NO_THIN="1", FUSED_LSTM_NO_BRGEMM="0",
               FUSED_LSTM_UNFUSED_INPUT="1", FUSED_LSTM_CUDA_PATH="step",
               FUSED_LSTM_CUDA_PERSISTENT_TILE="8", FUSED_LSTM_GEMM_LIBRARY="blas",
               FUSED_LSTM_NO_MEASURED_FUSION="1", FUSED_LSTM_NN_LSTM_FLOOR="never",
               # the same fused_lstm this process imported (the source tree's where none is
               # installed: conftest.py)
               PYTHONPATH=os.path.dirname(os.path.dirname(fused_lstm.__file__)))
    code = ("import fused_lstm, os; b = fused_lstm.backends; "
            "os.environ['FUSED_LSTM_NO_BRGEMM'] = '1'; "  # read at import only
            "print(b.cpu.allow_thin, b.cpu.allow_brgemm, b.cpu.allow_fused_input_projection, "
            "b.cuda.path, b.cuda.persistent_tile, b.cpu.gemm_library, "
            "b.cpu.fuse_by_measured_rates, b.cpu.nn_lstm_floor)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "True", "False", "step", "8", "blas", "False",
                                  "never"]
    env["FUSED_LSTM_CUDA_PATH"] = "fastest"
    run = subprocess.run([sys.executable, "-c", "import fused_lstm"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "FUSED_LSTM_CUDA_PATH='fastest'" in run.stderr


# The tests below were written in tests/test_ops.py and tests/test_module.py: each keeps the seed
# it had there (conftest.py seeds a test from its node id), so it runs on the inputs it was
# written and checked against.
SEEDED_AS = {
    "test_batch_split_over_threads": "tests/test_ops.py",
    "test_thin_products_split_over_threads": "tests/test_ops.py",
    "test_small_hidden_products_match_nn_lstm": "tests/test_ops.py",
    "test_float32_row_wise_path_matches_nn_lstm": "tests/test_ops.py",
    "test_thin_inference_matches_nn_lstm": "tests/test_ops.py",
    "test_float32_fused_input_projection_matches_nn_lstm": "tests/test_ops.py",
    "test_float32_fused_input_projection_same_as_unfused": "tests/test_ops.py",
    "test_float32_fused_inference_three_layers": "tests/test_ops.py",
    "test_float32_cell_pass_accuracy": "tests/test_ops.py",
    "test_float32_generic_cell_pass": "tests/test_ops.py",
    "test_bf16_training_within_twice_nn_lstm": "tests/test_module.py",
    "test_bf16_training_without_bf16_products": "tests/test_module.py",
    "test_bf16_fused_input_projection_same_as_unfused": "tests/test_module.py",
}


# ---- Each variant against nn.LSTM's own kernel, over its edges (op level) -----------------------

@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    with num_threads(2):
        yield


def assert_matches_nn_lstm(a, weight_scale, tol, inference_tol):
    """Outputs and every gradient of the op against nn.LSTM's own kernel (torch._VF.lstm) on the
    same tensors, the weights first scaled by ``weight_scale``; then lstm_inference against
    lstm_forward. make_case's weights (0.5 * randn) saturate tens of hidden units and grow the
    gradients to ~1e3 over tens of steps, so larger cases scale them to about nn.LSTM's own
    initialisation (1/sqrt(hidden))."""
    a["weights"] = [(w.detach() * weight_scale).requires_grad_() for w in a["weights"]]
    hx = (a["hx"], a["cx"])
    flags = (a["has_biases"], a["num_layers"], 0.0, False, a["bidirectional"])
    if a["batch_sizes"] is not None:
        expected = torch._VF.lstm(a["input"], a["batch_sizes"], hx, a["weights"], *flags)
    else:
        expected = torch._VF.lstm(a["input"], hx, a["weights"], *flags, False)
    got = call(ops.lstm, a)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    grads = [torch.randn_like(t) for t in got]
    wrt = differentiable(a)
    for g, e in zip(torch.autograd.grad(got, wrt, grads), torch.autograd.grad(expected, wrt, grads)):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)
    with torch.no_grad():
        for g, e in zip(call(LSTM_INFERENCE, a), got):
            torch.testing.assert_close(g, e, rtol=inference_tol, atol=inference_tol)


@pytest.mark.parametrize("bidirectional,proj_size,packed",
                         [(False, 0, False), (True, 0, True), (True, 16, False), (False, 16, True)])
def test_batch_split_over_threads(two_threads, bidirectional, proj_size, packed):
    """With two threads and enough recurrent work, each thread runs every step for its own slice
    of the batch (csrc/cpu: for_each_batch_slice), forward and backward; an odd batch makes the
    slices unequal and packed lengths make a slice run out of rows before the other. float64."""
    _, a = make_case(2, True, bidirectional, proj_size, packed, with_state=True,
                     input_size=5, hidden_size=64, seq_len=24, batch=9)
    assert_matches_nn_lstm(a, 1 / 8, tol=1e-10, inference_tol=1e-12)


@pytest.mark.parametrize("bidirectional,packed", [(False, False), (True, True)])
def test_thin_products_split_over_threads(two_threads, bidirectional, packed):
    """A batch of a few rows with a large hidden size (streaming inference): the products are
    split by columns over the threads (csrc/cpu gemm, kThinRows), the gradients' products of a
    few rows too. float64."""
    _, a = make_case(2, True, bidirectional, 0, packed, with_state=True,
                     input_size=7, hidden_size=256, seq_len=3, batch=2)
    assert_matches_nn_lstm(a, 1 / 32, tol=1e-10, inference_tol=1e-12)


SMALL_HIDDEN_CASES = [  # hidden, proj_size, batch, bidirectional, packed
    (3, 0, 1, False, False),
    (3, 0, 7, True, True),  # narrow: batch columns 4 + 2 + 1
    (3, 2, 6, False, True),  # narrow: 4 + 2, projection
    (5, 3, 10, False, False),  # batch blocks 8 + 2; rows of W_hr (3) and W_hh^T not in 4s
    (3, 0, 29, True, False),  # batch blocks 16 + 8 + 4 + 1
    (7, 5, 13, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hidden,proj_size,batch,bidirectional,packed", SMALL_HIDDEN_CASES,
                         ids=[f"H{h}-P{p}-B{b}-{'bi' if d else 'uni'}-{'packed' if k else 'padded'}"
                              for h, p, b, d, k in SMALL_HIDDEN_CASES])
def test_small_hidden_products_match_nn_lstm(dtype, hidden, proj_size, batch, bidirectional,
                                             packed):
    """Hidden sizes below 16 run in the batch-fastest layout (csrc/cpu: tiny_product): batches
    of 8 and more in blocks of 16, 8, 4, 2, 1 columns, weight rows 4 at a time and the rest one
    by one (W_hr's proj_size rows, W_hh^T's out rows in the backward); narrower batches along the
    weight rows, 4 batch columns at a time, then 2, then 1. Forward, every gradient and
    inference against nn.LSTM on the same tensors."""
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    _, a = make_case(2, True, bidirectional, proj_size, packed, with_state=True, dtype=dtype,
                     input_size=4, hidden_size=hidden, seq_len=5, batch=batch)
    assert_matches_nn_lstm(a, 1 / 2, tol=tol, inference_tol=tol / 10)


@pytest.mark.parametrize("hidden,batch", [(48, 9), (80, 70)], ids=["one-block", "blocks"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bidirectional,proj_size,packed",
                         [(False, 0, False), (True, 0, True), (True, 8, False), (False, 8, True)])
def test_float32_row_wise_path_matches_nn_lstm(threads, bidirectional, proj_size, packed, hidden,
                                                batch):
    """float32 at a hidden size of the row-wise path (>= 16): the recurrent products (forward
    and backward) go through oneDNN's brgemm micro-kernel where torch has it (csrc/cpu:
    brgemm_product, in blocks of 64 rows and 256 columns: 80 hidden units are 320 gate columns,
    70 rows two row blocks on one thread), on one thread or split over two by batch rows."""
    with num_threads(threads):
        _, a = make_case(2, True, bidirectional, proj_size, packed, with_state=True,
                         dtype=torch.float32, input_size=5, hidden_size=hidden, seq_len=12,
                         batch=batch)
        assert_matches_nn_lstm(a, 1 / 4, tol=1e-5, inference_tol=1e-6)


THIN_CASES = [  # hidden, input, batch, num_layers, bias, bidirectional, with_state
    (16, 11, 1, 1, True, False, True),
    (17, 5, 3, 2, False, True, False),
    (17, 2000, 2, 1, True, False, True),  # split over 2 threads: 16 units and 1
    (33, 19, 8, 3, True, True, True),
    (48, 27, 5, 1, True, False, False),
    (200, 40, 3, 2, True, True, True),  # 2 threads: the split crosses the directions
    (256, 64, 1, 2, True, False, True),  # stream-step
    (256, 64, 2, 2, False, True, True),
    (33, 19, 7, 2, True, False, True),
]


@pytest.mark.parametrize("seq_len", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hidden,input_size,batch,num_layers,bias,bidirectional,with_state",
                         THIN_CASES,
                         ids=[f"H{h}-I{i}-B{b}-L{l}-{'bias' if bi else 'nobias'}-{'bi' if d else 'uni'}"
                              f"-{'state' if s else 'nostate'}" for h, i, b, l, bi, d, s in THIN_CASES])
def test_thin_inference_matches_nn_lstm(seq_len, threads, dtype, hidden, input_size, batch,
                                        num_layers, bias, bidirectional, with_state):
    """Streaming inference (a batch of at most 8 rows, a hidden size from 16 on, no projection):
    lstm_inference takes the thin kernel (csrc/cpu: thin_forward; each thread owns a range of
    hidden units, dot products along the weight rows in blocks of 1 to 4 batch rows, scalar
    tails where the row lengths are not multiples of the vector width, units split unevenly
    over the threads). Against nn.LSTM on the same weights, and against lstm_forward; seq_len 3
    runs it step by step and, packed, with rows ending early (the reverse direction's rows then
    start from h0 and c0 at different steps)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for packed in ([False, True] if seq_len > 1 and batch > 1 else [False]):
        lstm, a = make_case(num_layers, bias, bidirectional, 0, packed, with_state, dtype=dtype,
                            input_size=input_size, hidden_size=hidden, seq_len=seq_len,
                            batch=batch, requires_grad=False, seed=hidden + batch)
        a["weights"] = [w / hidden ** 0.5 for w in a["weights"]]
        a["input"] = a["input"] * (hidden / input_size) ** 0.5
        hx = None if a["hx"] is None else (a["hx"], a["cx"])
        flags = (bias, num_layers, 0.0, False, bidirectional)
        with num_threads(threads):
            got = call(LSTM_INFERENCE, a)
            forward = call(LSTM_FORWARD, a)[:3]
        if hx is None:
            D = 2 if bidirectional else 1
            zeros = torch.zeros(num_layers * D, batch, hidden, dtype=dtype)
            hx = (zeros, zeros)
        if packed:
            expected = torch._VF.lstm(a["input"], a["batch_sizes"], hx, a["weights"], *flags)
        else:
            expected = torch._VF.lstm(a["input"], hx, a["weights"], *flags, False)
        for g, e, f in zip(got, expected, forward):
            torch.testing.assert_close(g, e, rtol=tol, atol=tol)
            torch.testing.assert_close(g, f, rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias,bidirectional,proj_size,packed,hidden,batch",
                         [(True, False, 0, False, 80, 70), (False, True, 0, True, 40, 9),
                          (True, True, 8, True, 40, 70), (True, False, 8, False, 40, 9)])
def test_float32_fused_input_projection_matches_nn_lstm(threads, bias, bidirectional, proj_size,
                                                         packed, hidden, batch):
    """float32, hidden >= 16, seq_len >= 2: each step's gates are b + x_t W_ih^T + h W_hh^T,
    both products through brgemm on the thread that runs the step (csrc/cpu: forward_step with
    x_t; W_ih transposed once per call by use_brgemm), training forward, backward and inference.
    Inputs wider than the hidden size and three layers (the deeper layers' input is the previous
    layer's D * out), with and without biases; 70 rows are two row blocks on one thread; 40
    hidden units are 160 gate columns, panels of 64 columns and a tail of 32."""
    with num_threads(threads), CPU.flags(fuse_by_measured_rates=False):
        _, a = make_case(3, bias, bidirectional, proj_size, packed, with_state=True,
                         dtype=torch.float32, input_size=37, hidden_size=hidden, seq_len=9,
                         batch=batch)
        assert_matches_nn_lstm(a, 1 / 4, tol=1e-5, inference_tol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bidirectional,packed", [(False, False), (True, True)])
def test_float32_fused_input_projection_same_as_unfused(threads, bidirectional, packed):
    """The fused input projection against the separate one (allow_fused_input_projection =
    False): same outputs, the same reserve (the activated gates and cells backward reads), the
    same inference results; with a dropout mask between layers and a projection; gradients
    against the plain PyTorch reference."""
    with num_threads(threads), CPU.flags(fuse_by_measured_rates=False):
        _, a = make_case(3, True, bidirectional, 8, packed, with_state=True, dtype=torch.float32,
                         input_size=24, hidden_size=36, seq_len=10, batch=11, dropout=0.3)
        a["weights"] = [(w.detach() / 4).requires_grad_() for w in a["weights"]]
        with torch.no_grad():
            fused = call(LSTM_FORWARD, a)
            fused_inference = call(LSTM_INFERENCE, a)
            with CPU.flags(allow_fused_input_projection=False):
                unfused = call(LSTM_FORWARD, a)
                unfused_inference = call(LSTM_INFERENCE, a)
        for f, u in zip(fused, unfused):  # output, h_n, c_n, reserve
            torch.testing.assert_close(f, u, rtol=1e-5, atol=1e-5)
        for f, u in zip(fused_inference, unfused_inference):
            torch.testing.assert_close(f, u, rtol=1e-5, atol=1e-5)
        for f, u in zip(fused_inference, fused[:3]):
            torch.testing.assert_close(f, u, rtol=1e-6, atol=1e-6)
        assert_results_and_grads_close(call(ops.lstm, a), call(reference.lstm_forward, a),
                                       differentiable(a), 1e-5, grad_tol=1e-4)


THREE_LAYER_CASES = [(False, 0, False, False), (True, 0, True, True), (True, 8, False, True),
                    (False, 8, True, False)]  # bidirectional, proj_size, packed, with_state


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bidirectional,proj_size,packed,with_state", THREE_LAYER_CASES,
                         ids=[f"{'bi' if d else 'uni'}-P{p}-{'packed' if k else 'padded'}-"
                              f"{'state' if w else 'nostate'}" for d, p, k, w in THREE_LAYER_CASES])
def test_float32_fused_inference_three_layers(threads, bidirectional, proj_size, packed,
                                              with_state):
    """float32 inference with every layer's input projection fused into its steps (csrc/cpu:
    inference_impl, use_brgemm), three layers whose outputs alternate between two buffers.
    Against nn.LSTM and lstm_forward; h_t kept in the layer output between steps (padded) or in
    h_n (packed lengths); without hx, the first step's product is skipped."""
    with num_threads(threads), CPU.flags(fuse_by_measured_rates=False):
        _, a = make_case(3, True, bidirectional, proj_size, packed, with_state=with_state,
                         dtype=torch.float32, input_size=20, hidden_size=24, seq_len=9, batch=7,
                         requires_grad=False)
        a["weights"] = [w / 4 for w in a["weights"]]
        hx = (a["hx"], a["cx"]) if with_state else zeros_state(a)
        flags = (True, 3, 0.0, False, bidirectional)
        if packed:
            expected = torch._VF.lstm(a["input"], a["batch_sizes"], hx, a["weights"], *flags)
        else:
            expected = torch._VF.lstm(a["input"], hx, a["weights"], *flags, False)
        got = call(LSTM_INFERENCE, a)
        for g, e, f in zip(got, expected, call(LSTM_FORWARD, a)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-6)


# ---- The float32 cell pass's activations (csrc/cpu/fast_math.h) ------------------------------

def cell_pass_case(hidden, batch, seed):
    """One layer whose gate pre-activations are its input: W_ih = I (input 4H), W_hh = 0, b_hh = 0,
    b_ih small, so every product is exact and the cell pass alone rounds. Inputs spread over
    [-20, 20] (every regime of sigmoid and tanh), two steps from h0 = 0 and a random c0."""
    _, a = make_case(1, True, False, 0, False, with_state=True, dtype=torch.float32,
                     input_size=4 * hidden, hidden_size=hidden, seq_len=2, batch=batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    a["input"] = (torch.rand(2, batch, 4 * hidden, generator=gen) * 40 - 20).requires_grad_()
    a["hx"] = torch.zeros(1, batch, hidden, requires_grad=True)
    a["cx"] = (torch.randn(1, batch, hidden, generator=gen) * 3).requires_grad_()
    bias = torch.rand(4 * hidden, generator=gen) * 2 - 1
    a["weights"] = [w.requires_grad_() for w in (torch.eye(4 * hidden), torch.zeros(4 * hidden, hidden),
                                                 bias, torch.zeros(4 * hidden))]
    return a


def cell_pass_errors(a, got):
    """The largest errors of (output, h_n, c_n) = got against float64, in units of 2^-24 times the
    magnitude of what was rounded: c_t = f c_{t-1} + i g by |f c_{t-1}| + |i g|, h_t = o tanh(c_t)
    by |h_t| + |o| (1 - tanh^2 c_t) times c_t's scale (where c_t's error reaches h_t)."""
    pre = (a["input"].detach() + a["weights"][2].detach()).double()  # x + b, rounded as the op does
    c = a["cx"].detach()[0].double()
    c_scale = torch.zeros_like(c)
    unit = 2.0 ** -24
    out, h_n, c_n = got
    h_err = 0.0
    for t in range(pre.shape[0]):
        pi, pf, pg, po = pre[t].chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(pi), torch.sigmoid(pf), torch.tanh(pg), torch.sigmoid(po)
        fc, ig = f * c, i * g
        c_scale = fc.abs() + ig.abs() + f * c_scale
        c = fc + ig
        h = o * torch.tanh(c)
        h_scale = h.abs() + o * (1 - torch.tanh(c) ** 2) * c_scale
        h_err = max(h_err, ((out[t].double() - h).abs() / (unit * h_scale + 1e-45)).max().item())
    h_err = max(h_err, ((h_n[0].double() - h).abs() / (unit * h_scale + 1e-45)).max().item())
    c_err = ((c_n[0].double() - c).abs() / (unit * c_scale + 1e-45)).max().item()
    return h_err, c_err


CELL_PASS_CASES = [(40, 9), (7, 12), (256, 4)]  # hidden, batch: a partial vector, the tiny path, 16s


def check_cell_pass(hidden, batch, seed=0):
    """Training (the pass that keeps the gates) and inference: within the activations' measured
    errors (sigmoid <= 3.8 ulp, tanh <= 5.3 ulp, benchmarks/notes/cell-pass.md, "A table exp and
    a rational tanh") plus the cell's own
    roundings, with room: 12 units for c, 16 for h (1 ulp is 1 to 2 units; 2 to 5 measured).
    Returns the outputs."""
    a = cell_pass_case(hidden, batch, seed)
    trained = call(ops.lstm, a)
    with torch.no_grad():
        inferred = call(LSTM_INFERENCE, a)
    for got in (trained, inferred):
        h_err, c_err = cell_pass_errors(a, [t.detach() for t in got])
        assert c_err <= 12 and h_err <= 16, (hidden, batch, h_err, c_err)
    return [t.detach() for t in (*trained, *inferred)]


@pytest.mark.parametrize("hidden,batch", CELL_PASS_CASES, ids=[f"H{h}-B{b}" for h, b in CELL_PASS_CASES])
def test_float32_cell_pass_accuracy(hidden, batch):
    """The float32 cell pass this CPU runs (on AVX-512: 16 elements at a time, exp through a
    table, csrc/cpu: cell_forward_vec16; else the vectorised scalar functions) against float64,
    over pre-activations spread across [-20, 20]."""
    check_cell_pass(hidden, batch)


def test_float32_generic_cell_pass():
    """The generic float32 cell pass (what CPUs without AVX-512 run), with allow_vec16_cell =
    False: the same accuracy bounds, parity with nn.LSTM through the row-wise and small-hidden
    paths, training and inference; and on an AVX-512 CPU, results that are not bitwise the
    16-lane pass's (the setting did switch the pass) yet agree closely."""
    here = [check_cell_pass(h, b) for h, b in CELL_PASS_CASES]
    with CPU.flags(allow_vec16_cell=False):
        generic = [check_cell_pass(h, b) for h, b in CELL_PASS_CASES]
        for hidden, batch, proj, packed in [(40, 9, 0, False), (24, 5, 8, True), (7, 12, 0, True)]:
            _, a = make_case(2, True, True, proj, packed, with_state=True, dtype=torch.float32,
                             input_size=6, hidden_size=hidden, seq_len=7, batch=batch)
            assert_matches_nn_lstm(a, 1 / 4, tol=1e-5, inference_tol=1e-6)
    differ = False
    for g_case, h_case in zip(generic, here):
        for g, h in zip(g_case, h_case):
            torch.testing.assert_close(g, h, rtol=2e-6, atol=2e-6)
            differ = differ or not torch.equal(g, h)
    if FEATURES["avx512"]:
        assert differ


# ---- bfloat16 models: bf16 products (AVX512_BF16) or float32 ------------------------------------

# (module options, seq_len, batch, packed). Where the CPU has AVX512_BF16, every product of
# these (hidden >= 16) takes bf16 operands, forward and backward: packed batches give steps of
# every size from `batch` rows down to 1, so the per-step dL/dh_{t-1} product sees batch slices
# of 1 to 11 rows (2 threads) and the weight gradients an odd number of rows; hidden 20 gives
# column counts off the 16-column blocks (out 20, 4H 80) and input 17 an odd one.
BF16_TRAINING = {
    "uni": (dict(input_size=24, hidden_size=32, num_layers=2), 10, 5, False),
    "bi": (dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True), 10, 5, False),
    "packed-uni": (dict(input_size=24, hidden_size=32, num_layers=2), 12, 21, True),
    "packed-bi-3layers": (dict(input_size=17, hidden_size=20, num_layers=3, bidirectional=True),
                          9, 13, True),
    "proj-bi": (dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True,
                     proj_size=12), 8, 7, False),
    # 2250 rows: the weight gradients sum over 1024 + 1024 + 202 (kBf16GradRows chunks)
    "chunked-bi": (dict(input_size=8, hidden_size=16, num_layers=2, bidirectional=True), 45, 50,
                   False),
    # packed, 1275 rows: the backward's recurrence hands dgates to the products in chunks of
    # steps of at most 1024 rows, h_{t-1} gathered per chunk, both directions
    "chunked-packed-bi": (dict(input_size=8, hidden_size=16, num_layers=2, bidirectional=True),
                          50, 50, True),
}


@pytest.mark.parametrize("case", BF16_TRAINING)
def test_bf16_training_within_twice_nn_lstm(case):
    """bf16 training at sizes with hidden >= 16 (where a CPU with AVX512_BF16 computes the
    products from bf16 operands, as oneDNN does), initial state given: outputs and every
    gradient are within twice nn.LSTM's bf16 distance to the float64 result, plus a bf16
    epsilon."""
    kwargs, seq_len, batch, packed = BF16_TRAINING[case]
    torch_lstm, fused = lstm_pair(dtype=torch.bfloat16, **kwargs)
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict(torch_lstm.state_dict())
    x = randn(seq_len, batch, kwargs["input_size"], dtype=torch.bfloat16)
    hx = tuple(t.detach() for t in make_state(fused, batch, torch.bfloat16))
    lengths = sorted((seq_len - i * seq_len // batch for i in range(batch)), reverse=True)
    if packed:
        assert sum(lengths) % 2 == 1 and lengths[-1] == 1
    out_rows = sum(lengths) if packed else seq_len * batch
    width = (2 if fused.bidirectional else 1) * (fused.proj_size or fused.hidden_size)
    upstream = [randn(out_rows, width), randn(*hx[0].shape), randn(*hx[1].shape)]

    def results(module, dtype):
        inputs = [x.to(dtype).requires_grad_(), *(t.to(dtype).requires_grad_() for t in hx)]
        inp = pack_padded_sequence(inputs[0], lengths) if packed else inputs[0]
        out, (h_n, c_n) = module(inp, (inputs[1], inputs[2]))
        out = out.data if packed else out.reshape(out_rows, width)
        leaves = inputs + list(module.parameters())
        grads = torch.autograd.grad((out, h_n, c_n), leaves, [u.to(dtype) for u in upstream])
        return [out, h_n, c_n, *grads]

    expected, ours, theirs = results(exact, F64), results(fused, torch.bfloat16), \
        results(torch_lstm, torch.bfloat16)
    assert_within_twice_nn_lstm(ours, expected, theirs, torch.finfo(torch.bfloat16).eps)


def test_bf16_training_without_bf16_products():
    """bf16 models on CPUs without AVX512_BF16 (allow_bf16_products = False): the op converts
    the bf16 tensors and computes in float32, and every case of
    test_bf16_training_within_twice_nn_lstm holds there too. Where this CPU has AVX512_BF16,
    the results differ in bits from the bf16 products' (the setting did switch the path)."""
    def probe():
        torch.manual_seed(5)
        m = FusedLSTM(24, 32, 2, bidirectional=True).to(torch.bfloat16)
        x = torch.randn(10, 5, 24, dtype=torch.bfloat16, requires_grad=True)
        y = m(x)[0]
        y.backward(torch.ones_like(y))
        return [y.detach(), x.grad]

    here = probe()
    with CPU.flags(allow_bf16_products=False):
        for case in BF16_TRAINING:
            test_bf16_training_within_twice_nn_lstm(case)
        forced = probe()
    for f, h in zip(forced, here):
        torch.testing.assert_close(f, h, rtol=0.05, atol=0.05)
    if FEATURES["avx512_bf16"]:
        assert any(not torch.equal(f, h) for f, h in zip(forced, here))


@pytest.mark.parametrize("case", ["bi", "packed-bi-3layers", "proj-bi"])
def test_bf16_fused_input_projection_same_as_unfused(case):
    """bf16 models: the input projection computed by each step for its rows (bf16_gemm, as the
    float32 brgemm path does) against one projection over every step
    (allow_fused_input_projection = False): the same outputs in training and inference, and the same gradients. Both
    sum the same bf16 products in float32; only where a step adds h_{t-1} W_hh^T differs."""
    kwargs, seq_len, batch, packed = BF16_TRAINING[case]
    _, fused = lstm_pair(dtype=torch.bfloat16, **kwargs)
    x = randn(seq_len, batch, kwargs["input_size"], dtype=torch.bfloat16)
    hx = tuple(t.detach() for t in make_state(fused, batch, torch.bfloat16))
    lengths = sorted((seq_len - i * seq_len // batch for i in range(batch)), reverse=True)

    def run():
        inputs = [x.clone().requires_grad_(), *(t.clone().requires_grad_() for t in hx)]
        inp = pack_padded_sequence(inputs[0], lengths) if packed else inputs[0]
        out, (h_n, c_n) = fused(inp, (inputs[1], inputs[2]))
        out = out.data if packed else out
        loss = out.float().square().sum() + h_n.float().sum() + c_n.float().sum()
        grads = torch.autograd.grad(loss, inputs + list(fused.parameters()))
        with torch.no_grad():
            inf_out, (inf_h, inf_c) = fused(inp, (inputs[1], inputs[2]))
        return [out, h_n, c_n, inf_out.data if packed else inf_out, inf_h, inf_c, *grads]

    joined = run()
    with CPU.flags(allow_fused_input_projection=False):
        apart = run()
    eps = torch.finfo(torch.bfloat16).eps
    for i, (j, a) in enumerate(zip(joined, apart)):
        scale = max(1.0, a.abs().max().item())
        assert (j.double() - a.double()).abs().max().item() <= eps * scale, i
        assert not torch.isnan(j).any(), i


# (hidden, input_size, batch, num_layers, bias, bidirectional, with_state, seq_len, packed): the
# thin kernel on a bfloat16 or float16 model, which reads the 16-bit W_ih and W_hh as they are. Hidden 16 is
# one unit block, 17 and 33 a block and a tail, 40 and 48 several blocks split unevenly over 2
# threads; input sizes and hidden sizes off the 16-, 8- and 4-lane vectors give scalar tails;
# input 2000 splits a one-unit-block layer over 2 threads (16 units and 1); hidden 256 with
# input 64 is stream-step.
THIN_BF16_CASES = [
    (16, 11, 1, 1, True, False, True, 1, False),
    (17, 5, 3, 2, False, True, False, 2, False),
    (17, 2000, 1, 1, True, False, True, 1, False),
    (33, 19, 4, 2, True, True, True, 3, True),
    (40, 24, 4, 2, True, True, True, 1, False),
    (48, 64, 2, 1, False, False, True, 3, False),
    (256, 64, 1, 2, True, False, True, 1, False),
]


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "hidden,input_size,batch,num_layers,bias,bidirectional,with_state,seq_len,packed",
    THIN_BF16_CASES,
    ids=[f"H{h}-I{i}-B{b}-L{l}-{'bias' if bi else 'nobias'}-{'bi' if d else 'uni'}"
         f"-{'state' if s else 'nostate'}-T{t}{'-packed' if p else ''}"
         for h, i, b, l, bi, d, s, t, p in THIN_BF16_CASES])
def test_16bit_thin_inference(dtype, threads, hidden, input_size, batch, num_layers, bias,
                              bidirectional, with_state, seq_len, packed):
    """bf16 and fp16 streaming inference runs the thin kernel on the 16-bit weights as the model
    holds them (explain: variant thin, keep_16bit true): outputs, h_n and c_n within twice
    nn.LSTM's distance in the same dtype to nn.LSTM in float64 on the same weights and inputs,
    plus an epsilon of the dtype; and the float32 model's results on the same weights rounded:
    float16 bit for bit (each weight widened exactly by vcvtph2ps, the sums in the float32
    kernel's order); bfloat16 up to the order of the sums (the kernel widens each bf16 weight
    exactly, two at a time from one 32-bit word, and sums the even and odd elements apart:
    within half a bf16 unit of the float32 results plus float32 summation error)."""
    kwargs = dict(input_size=input_size, hidden_size=hidden, num_layers=num_layers, bias=bias,
                  bidirectional=bidirectional)
    torch_lstm, fused = lstm_pair(dtype=dtype, **kwargs)
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict({k: v.double() for k, v in torch_lstm.state_dict().items()})
    as_f32 = FusedLSTM(dtype=F32, **kwargs)
    as_f32.load_state_dict({k: v.float() for k, v in torch_lstm.state_dict().items()})
    x = randn(seq_len, batch, input_size).to(dtype)
    hx = tuple(t.detach() for t in make_state(fused, batch, dtype)) if with_state else None
    lengths = sorted((seq_len - i * seq_len // batch for i in range(batch)), reverse=True)
    if packed:
        assert lengths[-1] < seq_len

    def run(module, dtype):
        inp = x.to(dtype)
        inp = pack_padded_sequence(inp, lengths) if packed else inp
        state = None if hx is None else tuple(t.to(dtype) for t in hx)
        with torch.no_grad():
            out, (h_n, c_n) = module(inp, state)
        return [out.data if packed else out, h_n, c_n]

    with num_threads(threads):
        plan = plan_of(fused, x, lengths if packed else None, train=False)
        assert plan["variant"] == "thin" and plan["keep_16bit"] == "true", plan
        ours = run(fused, dtype)
        widened = run(as_f32, F32)
    expected, theirs = run(exact, F64), run(torch_lstm, dtype)
    _assert_16bit_results(ours, expected, theirs, widened, same_sums=dtype == F16)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_16bit_thin_inference_makes_no_float_copy_of_the_weights(dtype):
    """bf16 and fp16 streaming inference (stream-step: input 64, hidden 256, 2 layers, one row,
    one step) allocates far less than the model's 16-bit weights during a call (the profiler's
    record of every allocation): no float32 copy of W_ih or W_hh (2x their bytes) is made."""
    from torch.profiler import ProfilerActivity, profile

    fused = FusedLSTM(64, 256, 2, dtype=dtype)
    x = randn(1, 1, 64).to(dtype)
    state = tuple(t.detach() for t in make_state(fused, 1, dtype))
    weight_bytes = sum(p.numel() * p.element_size() for p in fused.parameters())
    with torch.no_grad():
        assert plan_of(fused, x, None, train=False)["variant"] == "thin"
        fused(x, state)  # scratch buffers are recycled from the first call on
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fused(x, state)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events()
                    if e.self_cpu_memory_usage > 0)
    assert 0 < allocated < weight_bytes / 8, (allocated, weight_bytes)


# ---- bfloat16 and float16 at the small sizes: one conversion pass per call ----------------------
# A CPU call widens the caller's 16-bit tensors (input, weights, h0, c0, upstream gradients) by
# one loop into one scratch buffer and rounds its results by one loop (csrc/convert_16bit.cpp:
# widen_to_float, round_to), instead of an ATen conversion op per tensor; the arithmetic is
# float32 as before at these sizes (the small-hidden kernel, and the thin kernel on the 16-bit
# weights as they are).
# (variant, module options, seq_len, batch (None: unbatched input), with_state)
BF16_SMALL = {
    "small_hidden-seed-tiny": ("small_hidden", dict(input_size=1, hidden_size=3, num_layers=2),
                               4, 92, False),
    "small_hidden-small-state": ("small_hidden", dict(input_size=5, hidden_size=10,
                                                      num_layers=2), 3, 10, True),
    "small_hidden-1layer-bi-nobias": ("small_hidden", dict(input_size=4, hidden_size=5,
                                                           num_layers=1, bidirectional=True,
                                                           bias=False), 5, 7, True),
    "small_hidden-2layers-bi-batch_first": ("small_hidden", dict(
        input_size=6, hidden_size=7, num_layers=2, bidirectional=True, batch_first=True), 4, 9,
        True),
    "small_hidden-proj-nostate": ("small_hidden", dict(input_size=3, hidden_size=6,
                                                       num_layers=2, proj_size=2), 5, 6, False),
    "small_hidden-unbatched": ("small_hidden", dict(input_size=3, hidden_size=4, num_layers=2),
                               6, None, True),
    "thin-stream-step": ("thin", dict(input_size=64, hidden_size=256, num_layers=2), 1, 1, True),
    "thin-1layer-nobias-nostate": ("thin", dict(input_size=11, hidden_size=16, num_layers=1,
                                                bias=False), 2, 3, False),
    "thin-2layers-bi-batch_first": ("thin", dict(input_size=19, hidden_size=33, num_layers=2,
                                                 bidirectional=True, batch_first=True), 3, 4,
                                    True),
    "thin-unbatched-bi-nostate": ("thin", dict(input_size=24, hidden_size=40, num_layers=2,
                                               bidirectional=True), 2, None, False),
}


def _small_16bit_case(name, dtype=BF16):
    """(fused, nn.LSTM in `dtype`, nn.LSTM float64, FusedLSTM float32) on the same `dtype`
    weights, an input and state in `dtype` (None where the case has none)."""
    _, kwargs, seq_len, batch, with_state = BF16_SMALL[name]
    torch_lstm, fused = lstm_pair(dtype=dtype, **kwargs)
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict({k: v.double() for k, v in torch_lstm.state_dict().items()})
    as_f32 = FusedLSTM(dtype=F32, **kwargs)
    as_f32.load_state_dict({k: v.float() for k, v in torch_lstm.state_dict().items()})
    if batch is None:
        x = randn(seq_len, kwargs["input_size"]).to(dtype)
    elif kwargs.get("batch_first"):
        x = randn(batch, seq_len, kwargs["input_size"]).to(dtype)
    else:
        x = randn(seq_len, batch, kwargs["input_size"]).to(dtype)
    hx = None
    if with_state:
        hx = tuple(t.detach() for t in make_state(fused, batch, dtype, unbatched=batch is None))
    return fused, torch_lstm, exact, as_f32, x, hx


def _inference_results(module, x, hx, dtype):
    """[output, h_n, c_n] of a no-grad call of module on x and hx (or None) in `dtype`."""
    state = None if hx is None else tuple(t.to(dtype) for t in hx)
    with torch.no_grad():
        out, (h_n, c_n) = module(x.to(dtype), state)
    return [out, h_n, c_n]


def _bits(t, dtype=BF16):
    """The 16-bit patterns of t in `dtype` (t rounded by torch where it is not in it)."""
    return (t if t.dtype == dtype else t.to(dtype)).view(torch.int16)


def _assert_same_16bit(o, w):
    """o (bf16 or fp16) is w rounded by torch's .to(o.dtype), bit for bit; float16 NaNs only
    where w's are (torch's scalar and vector conversions give NaNs other payload bits)."""
    if o.dtype == BF16:
        assert torch.equal(_bits(o), _bits(w)), (o, w)
        return
    nan = torch.isnan(w)
    assert torch.equal(torch.isnan(o), nan if w.dtype == o.dtype else torch.isnan(w.to(o.dtype)))
    assert torch.equal(_bits(o, o.dtype)[~nan], _bits(w, o.dtype)[~nan]), (o, w)


def _assert_16bit_results(ours, expected, theirs, widened, same_sums=True):
    """bf16 or fp16 results: each within twice nn.LSTM's distance in the same dtype (plus one
    eps of the dtype times the scale) to nn.LSTM in float64 on the same weights, and bit for bit
    the float32 model's results on the widened weights rounded by torch. same_sums False (the
    thin kernel on bf16 weights, whose dot products sum in another order than the float32
    kernel's): each result the rounding of a float32 value within float32 summation error (1e-5
    of the scale) of the float32 model's, so at most half a unit in the last place (bf16: 2^-8
    of the value) plus that error from it."""
    dtype = ours[0].dtype
    assert dtype in (BF16, F16)
    half_ulp = torch.finfo(dtype).eps / 2  # of the value: bf16 2^-8, fp16 2^-11
    for i, (o, e, w) in enumerate(zip(ours, expected, widened)):
        assert o.dtype == dtype and o.shape == e.shape, i
        if same_sums:
            _assert_same_16bit(o, w)
        else:
            assert w.dtype == F32, i
            err = 1e-5 * max(1.0, w.abs().max().item())
            bound = (w.abs() + err) * half_ulp + err
            assert ((o.float() - w).abs() <= bound).all(), i
            assert torch.equal(torch.isnan(o), torch.isnan(w)), i
    assert_within_twice_nn_lstm(ours, expected, theirs, torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(BF16_SMALL))
def test_16bit_small_sizes_inference(name, threads, dtype):
    """bf16 and fp16 inference on the small-hidden and thin kernels (explain names the variant):
    outputs, h_n and c_n within twice nn.LSTM's distance in the same dtype to nn.LSTM in float64
    on the same weights and inputs, plus an epsilon of the dtype (the rule of the bf16 tests
    above); and bit for bit what float32 FusedLSTM computes on the same weights and inputs,
    rounded by torch's .to(dtype): the widening is exact and the rounding is torch's (the bf16
    thin kernel: up to the order of its sums, as test_16bit_thin_inference checks)."""
    variant = BF16_SMALL[name][0]
    model_dtype = dtype
    fused, torch_lstm, exact, as_f32, x, hx = _small_16bit_case(name, dtype)

    def run(module, dtype):
        return _inference_results(module, x, hx, dtype)

    with num_threads(threads):
        with torch.no_grad():
            assert fused_lstm.explain(fused, x)["forward"]["variant"] == variant
        ours = run(fused, model_dtype)
        widened = run(as_f32, F32)
    expected, theirs = run(exact, F64), run(torch_lstm, model_dtype)
    _assert_16bit_results(ours, expected, theirs, widened,
                          same_sums=variant != "thin" or model_dtype == F16)


@pytest.mark.parametrize("model_dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["small_hidden-small-state", "small_hidden-1layer-bi-nobias",
                                  "small_hidden-2layers-bi-batch_first",
                                  "small_hidden-unbatched"])
def test_16bit_small_hidden_training(name, model_dtype):
    """bf16 and fp16 training at small hidden sizes (float32 arithmetic): outputs and the
    gradients of input, h0, c0 and every weight within twice nn.LSTM's distance in the same
    dtype to nn.LSTM in float64 plus an epsilon of the dtype, and bit for bit float32
    FusedLSTM's on the same weights, inputs and upstream gradients, rounded by torch (the
    upstream gradients, of a 16-bit sum: expanded, not contiguous, widened in place; the
    gradients rounded as they leave the op)."""
    fused, torch_lstm, exact, as_f32, x, hx = _small_16bit_case(name, model_dtype)
    probe, _ = fused(x, hx)
    upstream_w = randn(*probe.shape[-1:]).to(model_dtype)

    def run(module, dtype):
        leaves = [x.to(dtype).requires_grad_(), *(t.to(dtype).requires_grad_() for t in hx)]
        out, (h_n, c_n) = module(leaves[0], tuple(leaves[1:]))
        loss = (out * upstream_w.to(dtype)).sum() + h_n.sum() + c_n.sum()
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
        return [out, h_n, c_n, *grads]

    ours, widened = run(fused, model_dtype), run(as_f32, F32)
    expected, theirs = run(exact, F64), run(torch_lstm, model_dtype)
    _assert_16bit_results(ours, expected, theirs, widened)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["small_hidden-small-state", "thin-1layer-nobias-nostate"])
def test_16bit_small_sizes_round_nan_and_denormals_as_torch(name, dtype):
    """The results' rounding is torch's to the bit where it matters most: a NaN (one input row
    holds one) becomes torch's NaN bits (bf16; fp16: a NaN), and denormal results (c_n = f * c0
    with c0 denormal and the g gate's weights and biases zero, so i * g = 0) are rounded, not
    flushed to zero."""
    fused, _, _, as_f32, x, _ = _small_16bit_case(name, dtype)
    H = fused.hidden_size
    with torch.no_grad():
        for module in (fused, as_f32):
            for p_name, p in module.named_parameters():
                if p_name.startswith(("weight_ih", "weight_hh", "bias_")):
                    p[2 * H:3 * H].zero_()
    batch = x.shape[1]
    x = x.clone()
    x[0, 1, 0] = float("nan")
    LD = fused.num_layers * (2 if fused.bidirectional else 1)
    h0 = randn(LD, batch, H).to(dtype)
    c = randn(LD, batch, H)
    # bf16: 1e-39 to ~5e-39; fp16: 1e-6 to ~5e-6 (its denormals)
    c0 = (c.sign() * (1 + c.abs()) * (1e-39 if dtype == BF16 else 1e-6)).to(dtype)
    assert (c0 != 0).all() and (c0.abs() < torch.finfo(dtype).tiny).all()
    with torch.no_grad():
        ours = fused(x, (h0, c0))
        widened = as_f32(x.float(), (h0.float(), c0.float()))
    ours, widened = [ours[0], *ours[1]], [widened[0], *widened[1]]
    assert torch.isnan(ours[0][:, 1]).all() and not torch.isnan(ours[0][:, 0]).any()
    c_n = widened[2][:, 0].to(dtype)
    assert ((c_n != 0) & (c_n.abs() < torch.finfo(dtype).tiny)).any()
    for o, w in zip(ours, widened):
        _assert_same_16bit(o, w)


def _ops_inside_fused_lstm(prof):
    """Names of the ATen ops that ran inside a fused_lstm op (the op's own events left out)."""
    names = []
    for e in prof.events():
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("fused_lstm::"):
            parent = parent.cpu_parent
        if parent is not None and not e.name.startswith("fused_lstm::"):
            names.append(e.name)
    return names


CONVERSION_OPS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous",
                  "aten::clone"}


# Training takes no batch_first case: the op saves a transposed input as a contiguous copy for
# backward, in every dtype, as nn.LSTM does (csrc/autograd.cpp, saveable_input); the thin kernel
# trains only calls of at most 8 rows (test_few_rows.py).
@pytest.mark.parametrize("name,train", [
    ("small_hidden-seed-tiny", False), ("small_hidden-small-state", False),
    ("small_hidden-2layers-bi-batch_first", False), ("thin-stream-step", False),
    ("thin-2layers-bi-batch_first", False), ("small_hidden-seed-tiny", True),
    ("small_hidden-1layer-bi-nobias", True), ("small_hidden-proj-nostate", True)])
@pytest.mark.parametrize("model_dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_16bit_small_sizes_make_no_conversion_ops(name, train, model_dtype):
    """A bf16 or fp16 call at the small sizes makes no ATen conversion op (the profiler's record
    of one call, forward and, training, backward): no aten::to / _to_copy / copy_ / contiguous /
    clone inside the fused_lstm ops, and no more ATen ops there than the same call in float32
    plus one (the scratch buffer of the widened tensors)."""
    from torch.profiler import ProfilerActivity, profile

    fused, _, _, as_f32, x, hx = _small_16bit_case(name, model_dtype)

    def ops_of(module, dtype):
        state = None if hx is None else tuple(t.to(dtype) for t in hx)
        inp = x.to(dtype).requires_grad_(train)

        def once():
            with torch.set_grad_enabled(train):
                out, (h_n, c_n) = module(inp, state)
                if train:
                    (out.sum() + h_n.sum() + c_n.sum()).backward()

        once()  # scratch buffers and lazily made state from the first call on
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            once()
        return _ops_inside_fused_lstm(prof)

    ours, f32 = ops_of(fused, model_dtype), ops_of(as_f32, F32)
    assert not CONVERSION_OPS & set(ours), ours
    assert len(ours) <= len(f32) + 1, (ours, f32)


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("model_dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_16bit_small_sizes_free_their_scratch(train, model_dtype):
    """A 16-bit call's widened tensors and float32 results are views of one scratch buffer,
    whose views' TensorImpls are kept per thread for the next call (csrc/lstm.cpp ViewPool):
    by the end of the call the buffer is freed all the same. What the call leaves allocated is
    exactly what it returns (and, training, the gradients it accumulates)."""
    from helpers import memory_events

    fused, _, _, _, x, hx = _small_16bit_case("small_hidden-seed-tiny", model_dtype)
    inp = x.requires_grad_(train)
    kept = []

    def once():
        with torch.set_grad_enabled(train):
            out, (h_n, c_n) = fused(inp, hx)
            if train:
                (out.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
                out, h_n, c_n = out.detach(), h_n.detach(), c_n.detach()
        kept.append((out, h_n, c_n))

    once()  # lazily made state (and .grad) from the first call on
    kept.clear()
    events = memory_events(once)
    net = sum(e.extra_fields.alloc_size for e in events)
    returned = sum(t.untyped_storage().nbytes() for t in kept[0])
    assert net == returned, (net, returned)
    # ... and while the call runs, its scratch counts: the widened input and the float32
    # results (4 bytes an element) are in it, whether the buffer was fresh or kept.
    in_use = peak = 0
    for e in sorted(events, key=lambda e: e.start_time_ns):
        in_use += e.extra_fields.alloc_size
        peak = max(peak, in_use)
    scratch_floats = inp.numel() + sum(t.numel() for t in kept[0])
    assert peak >= 4 * scratch_floats, (peak, scratch_floats)


# ---- Versions chosen by CPU feature, forced by name ---------------------------------------------
# The float16 conversions (csrc/convert_16bit.cpp: AVX-512F, AVX + F16C, scalar) and the thin kernel's
# dot products (csrc/cpu/thin.h: pre_v4, pre_v3, pre_base) are chosen at run time by what the
# CPU has; the test hook caps the level (2 AVX-512, 1 AVX2, 0 baseline) so that each version
# this CPU can run is checked, not only the one it picks.
_isa_levels, _isa_cap = isa_levels, isa_cap  # helpers.py


def test_every_isa_level_runs_on_this_cpu():
    """The levels cap as documented (a cap above this CPU's level runs this CPU's), and this
    CPU's level is what ATen reads of it (its CPU capability AVX512: 2, AVX2: 1, else 0)."""
    capability = torch.backends.cpu.get_cpu_capability()
    assert torch.ops.fused_lstm._isa_level(1) == {"AVX512": 2, "AVX2": 1}.get(capability, 0)
    model, x = FusedLSTM(4, 32, dtype=F16), randn(3, 2, 4).to(F16)
    names = ["scalar (c10)", "f16c (8 lanes)", "f16c (16 lanes, avx512)"]
    for level in _isa_levels():
        with _isa_cap(level):
            assert torch.ops.fused_lstm._isa_level(1) == level
            assert torch.ops.fused_lstm._isa_level(0) <= level
            assert (fused_lstm.explain(model, x)["forward"]["fp16_conversions"]
                    == names[torch.ops.fused_lstm._isa_level(0)])
    with _isa_cap(5):
        assert torch.ops.fused_lstm._isa_level(1) == _isa_levels()[-1]


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
def test_16bit_conversions_match_torch_at_every_isa_level(level):
    """The op boundary's conversions (fused_lstm::_convert_16bit: widen_to_float, round_to) at
    each ISA level: float32 rounded to bf16 and fp16 as torch's .to() rounds it, bit for bit
    (NaN: a NaN), over random values, every fp16 magnitude from denormals to overflow, ties,
    infinities and lengths off the vector width; bf16 and fp16 widened exactly (every fp16 bit
    pattern; strided input)."""
    if level not in _isa_levels():
        pytest.skip(f"this CPU's vector ISA is below level {level}")
    convert = torch.ops.fused_lstm._convert_16bit
    g = torch.Generator().manual_seed(7)
    special = torch.tensor([0.0, -0.0, 1e-8, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 6.0e-5,
                            65504.0, 65519.0, 65520.0, 1e6, float("inf"), float("-inf"),
                            float("nan"), 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1e-39, 3e38])
    values = torch.cat([special, -special,
                        torch.randn(1000, generator=g) * 10.0 ** torch.randint(
                            -9, 6, (1000,), generator=g)])
    with _isa_cap(level):
        for n in (values.numel(), 37, 16, 15, 8, 7, 1):
            v = values[:n]
            for dtype in (BF16, F16):
                ours = convert(v, dtype)
                assert ours.dtype == dtype
                _assert_same_16bit(ours, v)
        every_fp16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(F16)
        widened = convert(every_fp16, F32)
        assert torch.equal(torch.isnan(widened), torch.isnan(every_fp16.float()))
        finite = ~torch.isnan(widened)
        assert torch.equal(widened[finite], every_fp16.float()[finite])
        for dtype in (BF16, F16):
            strided = randn(6, 5, 9).to(dtype).transpose(0, 2)
            assert torch.equal(convert(strided, F32), strided.float())


@pytest.mark.parametrize("level", [0, 1, 2], ids=["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("case", ["thin-stream-step", "thin-2layers-bi-batch_first",
                                  "thin-unbatched-bi-nostate"])
def test_thin_kernel_at_every_isa_level(level, case):
    """The thin kernel's version of each ISA level (pre_v4, pre_v3, pre_base), in float32,
    bfloat16 and float16: float32 within float32 rounding of nn.LSTM in float64; float16 bit
    for bit the float32 model's at the same level rounded; bfloat16 within half a bf16 unit of
    it plus float32 summation error (the rule of test_16bit_thin_inference)."""
    if level not in _isa_levels():
        pytest.skip(f"this CPU's vector ISA is below level {level}")
    with _isa_cap(level):
        assert torch.ops.fused_lstm._isa_level(1) == level
        for dtype in (BF16, F16):
            fused, torch_lstm, exact, as_f32, x, hx = _small_16bit_case(case, dtype)

            def run(module, dt):
                return _inference_results(module, x, hx, dt)

            with torch.no_grad():
                assert fused_lstm.explain(fused, x)["forward"]["variant"] == "thin"
            widened, expected = run(as_f32, F32), run(exact, F64)
            for w, e in zip(widened, expected):
                torch.testing.assert_close(w.double(), e, rtol=1e-5, atol=1e-5)
            _assert_16bit_results(run(fused, dtype), expected, run(torch_lstm, dtype), widened,
                                  same_sums=dtype == F16)


# The hidden split of inference steps (csrc/cpu/hidden_split.h), forced by name: input, hidden,
# layers, bidirectional, bias, with_state, batch. Hidden sizes with tails (units go to threads
# in blocks of 16: 50 = 32 + 18, 100 = 48 + 52; gate columns cross the 64-column panels
# mid-panel), odd batches (33 rows: a row block of 33; 70: two blocks of 64 and 6 on the tiles).
HIDDEN_SPLIT_CASES = [
    (24, 50, 1, False, True, True, 9),
    (40, 100, 2, True, False, False, 33),
    (36, 64, 2, False, True, False, 70),
    (10, 48, 1, True, True, True, 11),
]


def _hidden_split_outputs(module, x, hx):
    with torch.no_grad():
        out, (h_n, c_n) = module(x, hx)
    return [t.double() for t in (out, h_n, c_n)]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("input_size,hidden,num_layers,bidirectional,bias,with_state,batch",
                         HIDDEN_SPLIT_CASES,
                         ids=[f"I{i}-H{h}-L{l}-{'bi' if d else 'uni'}-{'bias' if b else 'nobias'}"
                              f"-{'state' if s else 'nostate'}-B{n}"
                              for i, h, l, d, b, s, n in HIDDEN_SPLIT_CASES])
def test_hidden_split_inference_matches_nn_lstm(dtype, input_size, hidden, num_layers,
                                                bidirectional, bias, with_state, batch):
    """Inference with the steps split over two threads by hidden units (each thread its units'
    gate columns of W_hh^T for every row, the cell pass for its units, a barrier per step),
    float32 on brgemm and bfloat16 on AMX tiles, forced wherever it applies
    (hidden_split_by_measured_rates off): explain reports it for every layer, and the results
    are within check_against_nn_lstm's rule of nn.LSTM in float64 on the same weights; with
    allow_hidden_split off the plan has the batch split again."""
    need = hidden_split_feature(dtype)
    if not FEATURES[need]:
        pytest.skip(f"this CPU lacks {need}")
    kwargs = dict(input_size=input_size, hidden_size=hidden, num_layers=num_layers,
                  bidirectional=bidirectional, bias=bias)
    seq_len = 7
    torch_lstm = nn.LSTM(dtype=dtype, **kwargs)
    torch_lstm.load_state_dict({k: v * 0.5 for k, v in torch_lstm.state_dict().items()})
    fused = FusedLSTM(dtype=dtype, **kwargs)
    fused.load_state_dict(torch_lstm.state_dict())
    exact = nn.LSTM(dtype=F64, **kwargs)
    exact.load_state_dict({k: v.double() for k, v in torch_lstm.state_dict().items()})
    x = randn(seq_len, batch, input_size).to(dtype)
    D = 2 if bidirectional else 1
    hx = ((randn(num_layers * D, batch, hidden).to(dtype),
           randn(num_layers * D, batch, hidden).to(dtype)) if with_state else None)
    settings = dict(allow_thin=False, allow_hidden_split=True, hidden_split_by_measured_rates=False)
    with num_threads(2), CPU.flags(**settings):
        with torch.no_grad():
            plan = fused_lstm.explain(fused, x)["forward"]
        for layer in range(num_layers):
            assert plan[f"step_split.{layer}"] == "hidden (hidden_split_by_measured_rates off)", plan
        ours = _hidden_split_outputs(fused, x, hx)
        with CPU.flags(allow_hidden_split=False):
            with torch.no_grad():
                off = fused_lstm.explain(fused, x)["forward"]
            assert not any(k.startswith("step_split") for k in off), off
    expected = _hidden_split_outputs(
        exact, x.double(), None if hx is None else tuple(t.double() for t in hx))
    theirs = _hidden_split_outputs(torch_lstm, x, hx)
    assert_within_twice_nn_lstm(ours, expected, theirs, FLOOR[dtype])


def test_hidden_split_rule_leaves_amx_steps_to_the_batch_split():
    """A bfloat16 model's AMX steps take the hidden split only where it is forced
    (hidden_split_by_measured_rates off): their one-thread probe is not reliable enough for the
    rule (csrc/cpu/plan.h, hidden_split_layer)."""
    if not FEATURES["amx_bf16"]:
        pytest.skip("this CPU lacks amx_bf16")
    module = FusedLSTM(48, 96, num_layers=2, dtype=BF16)
    x = randn(6, 40, 48).to(BF16)
    with num_threads(2), torch.no_grad():
        plan = fused_lstm.explain(module, x)["forward"]
        for layer in range(2):
            assert plan[f"step_split.{layer}"].startswith("batch (AMX steps"), plan
        with CPU.flags(hidden_split_by_measured_rates=False):
            plan = fused_lstm.explain(module, x)["forward"]
        for layer in range(2):
            assert plan[f"step_split.{layer}"].startswith("hidden"), plan


@pytest.mark.parametrize("dtype", [F32], ids=["f32"])
def test_hidden_split_follows_the_measured_rates(dtype):
    """With allow_hidden_split on (the default) the hidden split runs a layer exactly where
    one thread's step measured on its shape (every row, a thread's share of the gate columns)
    beats the batch split's (the thread's rows, every column) by more than 10%, as explain
    reports both; either way the call matches the batch split's results (the same products,
    column by column). Off, explain reports no step split and the batch split runs."""
    need = hidden_split_feature(dtype)
    if not FEATURES[need]:
        pytest.skip(f"this CPU lacks {need}")
    module = FusedLSTM(48, 96, num_layers=2, dtype=dtype)
    x = randn(6, 40, 48).to(dtype)
    with num_threads(2), CPU.flags(allow_hidden_split=True):
        with torch.no_grad():
            plan = fused_lstm.explain(module, x)["forward"]
            for layer in range(2):
                m = re.fullmatch(r"(hidden|batch) \(one thread's step: batch split ([0-9.e+-]+) us"
                                 r"( fused)?, hidden split ([0-9.e+-]+) us\)",
                                 plan[f"step_split.{layer}"])
                assert m, plan[f"step_split.{layer}"]
                batch_us, hidden_us = float(m.group(2)), float(m.group(4))
                assert (m.group(1) == "hidden") == (1.1 * hidden_us < batch_us), m.group(0)
            default = module(x)
            with CPU.flags(allow_hidden_split=False):
                batch_split = module(x)
    with num_threads(2), torch.no_grad():
        assert any(k.startswith("step_split") for k in fused_lstm.explain(module, x)["forward"])
        with CPU.flags(allow_hidden_split=False):
            assert not any(k.startswith("step_split")
                           for k in fused_lstm.explain(module, x)["forward"])
    for a, b in zip(default[:1] + default[1], batch_split[:1] + batch_split[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# 16-bit inference on the row-wise path, the output written in the model's dtype by the steps
# (CpuPlan::output_16bit). name: (input, hidden, layers, bidirectional, proj_size, batch,
# packed, settings).
OUTPUT_16BIT_CASES = {
    "1layer": (24, 40, 1, False, 0, 12, False, {}),
    "2layers-bi": (24, 40, 2, True, 0, 12, False, {}),
    "proj": (24, 40, 2, False, 16, 12, False, {}),
    "packed-bi": (24, 40, 2, True, 0, 12, True, {}),
    "3layers-packed-bi-proj": (30, 48, 3, True, 24, 9, True, {}),
    "hidden-split": (48, 128, 2, False, 0, 40, False,
                     dict(allow_hidden_split=True, hidden_split_by_measured_rates=False)),
    "unfused": (24, 40, 2, False, 0, 12, False, dict(allow_fused_input_projection=False)),
    "unfused-packed-bi": (24, 40, 2, True, 0, 12, True,
                          dict(allow_fused_input_projection=False)),
    "float32-products": (24, 40, 2, False, 0, 12, False, dict(allow_bf16_products=False)),
    "no-brgemm": (24, 40, 2, True, 0, 12, False, dict(allow_brgemm=False)),
}


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(OUTPUT_16BIT_CASES))
def test_16bit_inference_writes_its_output_in_its_dtype(name, dtype):
    """bfloat16 and float16 inference on the row-wise path: explain reports output_16bit, and
    the output, h_n and c_n are bit for bit the training forward's on the same call (which
    rounds a float32 layer output at its end): the steps carry h_t in float32 and round each
    step's rows into the output as torch rounds (benchmarks/notes/memory.md, "16-bit inference:
    the output in its dtype"). The hidden split's last layer writes a float32 layer output
    that is rounded after it; the products' libraries and fusion are fixed, so that both calls
    run the same products (a float16 model's inference reads its input, W_ih and W_hh as
    kept, widening them where a float32 product reads them: the same values) (and the hidden
    size is a multiple of the AMX panels' 64 columns:
    where the hidden split's column ranges cross a panel, its bf16 products can differ from
    the batch split's in the last bit)."""
    input_size, hidden, layers, bi, proj, batch, packed, settings = OUTPUT_16BIT_CASES[name]
    if settings.get("allow_hidden_split") and not FEATURES[hidden_split_feature(dtype)]:
        pytest.skip("the hidden split needs brgemm (float32 products) or AMX-BF16 (bf16)")
    module = FusedLSTM(input_size, hidden, layers, bidirectional=bi, proj_size=proj).to(dtype)
    D, T = 2 if bi else 1, 9
    x = randn(T, batch, input_size).to(dtype)
    hx = (randn(layers * D, batch, proj or hidden).to(dtype),
          randn(layers * D, batch, hidden).to(dtype))
    if packed:
        lengths = random_lengths(batch, T, sort=False)
        x = pack_padded_sequence(x, lengths, enforce_sorted=False)
    fixed = dict(settings, fuse_by_measured_rates=False, gemm_library="blas",
                 nn_lstm_floor="never")
    with num_threads(2), CPU.flags(**fixed):
        with torch.no_grad():
            plan = fused_lstm.explain(module, x)["forward"]
            assert plan["variant"] == "row_wise" and plan["output_16bit"] == "true", plan
            out, (h_n, c_n) = module(x, hx)
        train_out, (train_h, train_c) = module(x, tuple(t.requires_grad_() for t in hx))
    if packed:
        out, train_out = out.data, train_out.data
    for ours, theirs in ((out, train_out), (h_n, train_h), (c_n, train_c)):
        assert ours.dtype == dtype
        _assert_same_16bit(ours, theirs.detach().float())


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_16bit_inference_allocates_no_float_output(dtype):
    """Where the steps write a 16-bit model's output in its dtype, no float32 output of the
    call's size is allocated: at a long sequence of few features, where the fused input
    projection keeps the gates to one step, no allocation of the inference call is as large
    as that float32 output would be (the build before made one: the output in the op's scratch,
    rounded at the end)."""
    T, B, I, H = 400, 9, 16, 32
    module = FusedLSTM(I, H).to(dtype)  # one layer: no float32 layer output below the last
    x = randn(T, B, I).to(dtype)
    with num_threads(2), CPU.flags(fuse_by_measured_rates=False, allow_hidden_split=False,
                                   nn_lstm_floor="never"), torch.no_grad():
        assert fused_lstm.explain(module, x)["forward"]["output_16bit"] == "true"
        module(x)  # warm: packed weights and scratch sized
        sizes = allocation_sizes(lambda: module(x))
    float_output = T * B * H * 4
    assert T * B * H * 2 in sizes, sorted(sizes)  # the output, in its dtype
    assert max(sizes) < float_output, sorted(sizes)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_fp16_inference_makes_no_float_copies_of_input_and_weights(fused):
    """A float16 model's inference on the row-wise path with brgemm's steps reads its input,
    W_ih and W_hh as given (CpuPlan::fp16_kept_inference; explain: keep_16bit): nothing of their
    float32 sizes is allocated, and the call allocates less in all than the float32 model's
    same call (the build before allocated more: float32 copies of all three and of the output).
    brgemm's panels are packed from the float16 weights, and the unfused projection widens one
    layer's W_ih, and a chunk's rows of the input, just before its GEMM (the W_ih of this
    one-layer model is widened whole, and brgemm's panels are W_hh^T's alone, W_hh's size:
    their sizes are checked only fused). The results are checked
    bit for bit against the training forward in
    test_16bit_inference_writes_its_output_in_its_dtype."""
    if not FEATURES["brgemm"]:
        pytest.skip("this torch's brgemm micro-kernel does not run here")
    T, B, I, H = 1200, 12, 24, 40  # longer than a projection chunk (2^20 gates: 546 steps)
    model = FusedLSTM(I, H).to(F16)
    as_f32 = FusedLSTM(I, H)
    as_f32.load_state_dict(model.state_dict())
    x = randn(T, B, I).to(F16)
    x_f32 = x.float()
    with num_threads(2), CPU.flags(allow_fused_input_projection=fused,
                                   fuse_by_measured_rates=False, allow_hidden_split=False,
                                   nn_lstm_floor="never"), torch.no_grad():
        plan = fused_lstm.explain(model, x)["forward"]
        assert plan["keep_16bit"] == "true", plan
        assert plan["input_projection.0"].endswith("fused into the steps") == fused, plan
        model(x)  # warm: buffers cached
        sizes = allocation_sizes(lambda: model(x))
        as_f32(x_f32)
        f32_sizes = allocation_sizes(lambda: as_f32(x_f32))
    assert sum(sizes) < sum(f32_sizes), (sorted(sizes), sorted(f32_sizes))
    copies = {"input": T * B * I * 4, "W_ih": 4 * H * I * 4, "W_hh": 4 * H * H * 4}
    assert len(set(copies.values())) == 3
    if not fused:  # (brgemm's panels then hold W_hh^T alone: W_hh's float32 size, packed)
        del copies["W_ih"], copies["W_hh"]
    for name, size in copies.items():
        assert size not in sizes, (name, sorted(sizes))
