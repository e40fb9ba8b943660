"""Quantization algorithms: schemes (scheme.py), grids (grid.py int, fp8.py), RTN (rtn.py), GPTQ (gptq.py) and the
streaming Hessian (hessian.py); api.py quantizes one Linear. Import from the submodules."""
