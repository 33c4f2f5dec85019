"""File names inside the folders the PKI writes and reads.

The cacerts names are the ones Istio's plug-in CA expects in its `cacerts` secret, and the workload names
are the ones Istio's file-mounted workload certificates use, so folders can be swapped with Istio's.
"""

from __future__ import annotations

# A root folder (written by `certs root`).
ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"

# A per-cluster cacerts folder (written by `certs cluster`).
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"  # the intermediate then the root, as Istio's plug-in layout has it

# A workload folder (written by `certs workload`): CERT_CHAIN is the leaf then intermediates, no root.
WORKLOAD_KEY = "key.pem"

# Private keys are readable by their owner only; certificates are public. Folders we create are the owner's
# only: a folder holds keys, and whoever can write to it can swap them.
KEY_MODE = 0o600
CERT_MODE = 0o644
FOLDER_MODE = 0o700
