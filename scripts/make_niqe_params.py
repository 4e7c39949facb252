"""Rebuild assets/niqe_modelparameters.mat from the NIQE pristine statistics in basicsr 1.4.2's sdist.

pyiqa downloads the same statistics from the hub at run time; shipping them lets NIQE run
offline. Usage: `python scripts/make_niqe_params.py` (needs PyPI access and scipy). The sdist
is fetched from PyPI's simple index and checked against its published sha256.
"""

import hashlib
import io
import re
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import scipy.io

OUT = Path(__file__).resolve().parents[1] / "assets" / "niqe_modelparameters.mat"
INDEX = "https://pypi.org/simple/basicsr/"
SDIST = "basicsr-1.4.2.tar.gz"
SHA256 = "b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87"
MEMBER = "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz"


def main() -> None:
    html = urllib.request.urlopen(INDEX, timeout=60).read().decode()
    url = re.search(rf'href="([^"]+/{re.escape(SDIST)})#sha256={SHA256}"', html).group(1)
    data = urllib.request.urlopen(url, timeout=120).read()
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise SystemExit(f"{SDIST}: sha256 mismatch")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        params = np.load(io.BytesIO(tar.extractfile(MEMBER).read()))
        mu, cov = params["mu_pris_param"], params["cov_pris_param"]
    scipy.io.savemat(OUT, {"mu_prisparam": mu, "cov_prisparam": cov})
    print(f"wrote {OUT}: mu {mu.shape}, cov {cov.shape}")


if __name__ == "__main__":
    main()
