#!/usr/bin/env bash
# Build a fastdream wheel for one CUDA target (or CPU only) and tag it with a local version,
# e.g. fastdream-0.1.0+cu130sm90-cp311-cp311-linux_x86_64.whl.
#
#   csrc/tools/build_wheel.sh 9.0            # sm_90 only (H100)
#   csrc/tools/build_wheel.sh "8.0;8.6;9.0+PTX"
#   csrc/tools/build_wheel.sh cpu            # CPU kernels only (+cpu)
#
# Uses the torch of the active Python (it decides the CUDA runtime: cu130 for torch 2.14.1+cu130).
# Env: CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default 2), OUT (default dist/).
set -euo pipefail
target="${1:?usage: build_wheel.sh <TORCH_CUDA_ARCH_LIST>|cpu}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${OUT:-$root/dist}"
export MAX_JOBS="${MAX_JOBS:-2}"
py="${PYTHON:-python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ "$target" == "cpu" ]]; then
    export FASTDREAM_BUILD_CUDA=0
    tag="cpu"
else
    export FASTDREAM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$target" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
    cu="$("$py" -c 'import torch; print((torch.version.cuda or "").replace(".", ""))')"
    [[ -n "$cu" ]] || { echo "build_wheel.sh: the active torch has no CUDA; use a CUDA torch or 'cpu'" >&2; exit 1; }
    sms="$(echo "$target" | tr ';, ' '\n\n\n' | sed 's/+PTX//; s/\.//' | grep -v '^$' | sort -u | tr -d '\n')"
    tag="cu${cu}sm${sms}"
fi

cd "$root"
start=$(date +%s)
"$py" -m pip wheel --no-build-isolation --no-deps -w "$work" . >&2
echo "build_wheel.sh: compiled in $(( $(date +%s) - start )) s" >&2
wheel="$(ls "$work"/fastdream-*.whl)"
# add the local version (+tag): rewrite the wheel's dist-info (name, METADATA Version, RECORD hashes)
mkdir -p "$out"
"$py" - "$wheel" "$tag" "$out" <<'PY'
import base64, hashlib, os, re, sys, zipfile
src, tag, out = sys.argv[1], sys.argv[2], sys.argv[3]
name = os.path.basename(src)
dist, ver, rest = name.split("-", 2)
new_ver = f"{ver}+{tag}"
old_info, new_info = f"{dist}-{ver}.dist-info/", f"{dist}-{new_ver}.dist-info/"
files = {}
with zipfile.ZipFile(src) as z:
    for item in z.infolist():
        data = z.read(item)
        path = item.filename.replace(old_info, new_info, 1) if item.filename.startswith(old_info) else item.filename
        if path == new_info + "METADATA":
            data = re.sub(rb"^Version: .*$", f"Version: {new_ver}".encode(), data, count=1, flags=re.M)
        files[path] = data
record = new_info + "RECORD"
lines = []
for path, data in files.items():
    if path == record:
        continue
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines.append(f"{path},sha256={digest},{len(data)}")
lines.append(f"{record},,")
files[record] = ("\n".join(lines) + "\n").encode()
dst = os.path.join(out, f"{dist}-{new_ver}-{rest}")
with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
    for path, data in files.items():
        z.writestr(path, data)
print(dst)
PY
