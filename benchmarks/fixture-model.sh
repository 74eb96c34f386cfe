# Sourced by the benchmarks: fixture_model OUT SHAPE TYPE prints the path of a random-weight DECO GGUF in a
# released shape (deco-0.1b, deco-0.5b) with routers calibrated to ~20% activation, quantized to TYPE; the
# checkpoint, its F16 conversion and the quantized file are made once and kept in OUT.
fixture_model() {
    local out=$1 shape=$2 type=$3
    local ckpt="$out/$shape" f16="$out/$shape-f16.gguf" model="$out/$shape-$type.gguf"
    [ -f "$ckpt/config.json" ] || deco-gguf fixture "$shape" "$ckpt" --calibrate 0.2 >&2
    [ -f "$f16" ] || deco-gguf convert "$ckpt" -o "$f16" --outtype f16 -q >&2
    [ -f "$model" ] || deco-gguf quantize "$f16" "$model" "${type^^}" >/dev/null
    echo "$model"
}
