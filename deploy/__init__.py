"""Deployment to a Rockchip NPU: ONNX export, RKNN conversion (in .venv-rknn), evaluation, board package.

    python -m deploy --model RUN/final --target rv1126b --out dist/rv1126b      # every step, see deploy/__main__.py
    python -m deploy.export_onnx --model RUN/final --out DIST/onnx              # one step at a time
    .venv-rknn/bin/python deploy/convert_rknn.py --onnx_dir DIST/onnx --calib DIST/onnx/calib.npz --out DIST/rknn
    python -m deploy.package --dist DIST --precision w8a8
    python -m deploy.estimate --dist DIST --precision w8a8

Nothing here imports rknn: convert_rknn.py and rknn_sim_eval.py run in the RKNN venv as subprocesses.
"""
