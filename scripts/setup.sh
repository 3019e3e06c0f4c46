#!/usr/bin/env bash
# Sourced by run.sh and test.sh: create .venv and install the project into it, CPU torch first (the local
# torch==2.13.0 wheel, so pip never pulls a multi-GB CUDA build). $1: pip extras, e.g. "[test]".
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".${1:-}"
