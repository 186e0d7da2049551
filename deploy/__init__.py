"""Deployment to a Rockchip NPU: ONNX export, RKNN conversion (in .venv-rknn), evaluation, board package.

    python -m deploy --model RUN/final --target rv1126b --out dist/rv1126b      # every step, see deploy/__main__.py
    python -m deploy.export_onnx --model RUN/final --out DIST/onnx              # one step at a time
    .venv-rknn/bin/python -m deploy.convert_rknn --onnx_dir DIST/onnx --calib DIST/onnx/calib.npz --out DIST/rknn
    python -m deploy.package --dist DIST --precision w8a8
    python -m deploy.estimate --dist DIST --precision w8a8

Every entry point runs as a module from the repository root. Nothing here imports rknn: convert_rknn.py and
rknn_sim_eval.py run in the RKNN venv as subprocesses. The DIST folder's format and the greedy loop are
deploy/contract.py's (numpy only), which every writer and reader imports. This file imports nothing, so that venv
(no transformers) can import those modules.
"""
