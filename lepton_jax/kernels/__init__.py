"""Pallas kernels for TPU and GPU, each beside the XLA reference it must equal (the fallback on
every other backend); `int8_matmul` holds the int8 matmuls of quantized inference, `attention`
the TPU splash attention kernel under the mesh."""
