"""Option help shared by the commands."""

KV_DTYPE_HELP = ("float16 or float32: how a float KV cache is kept (default: float16 on the numpy backend, as "
                 "llama.cpp's cache; the activations' dtype on MLX).")
