#!/usr/bin/env bash
# slurm/submit.sh PRESET [dms-refit overrides...]: sbatch slurm/refit.sbatch with a preset's resources and overrides
# (slurm/presets/PRESET.sh). Extra sbatch flags: SBATCH_EXTRA="--partition=batch --account=proj" slurm/submit.sh ...
# Later overrides win: the preset's first, then yours. Prints sbatch's "Submitted batch job N".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
preset=${1:?usage: slurm/submit.sh PRESET [overrides...]; presets: $(cd "$here/presets" && ls | sed 's/\.sh$//' | xargs)}
shift
[ -f "$here/presets/$preset.sh" ] || { echo "error: no preset $preset in $here/presets" >&2; exit 2; }
source "$here/presets/$preset.sh"
# shellcheck disable=SC2086
exec sbatch "${SBATCH_ARGS[@]}" ${SBATCH_EXTRA:-} "$here/refit.sbatch" "${OVERRIDES[@]}" "$@"
