"""The version every daemon reports in `istio_build{tag}`."""

VERSION = "0.1.0"
