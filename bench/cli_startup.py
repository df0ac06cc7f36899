"""How fast the CLI answers without doing work: `--help`, a command's `--help`, and an argument error.

Target (issue: foundation): under 0.5 s. Run: python bench/cli_startup.py [runs]
"""
import statistics
import subprocess
import sys
import time

CASES = {
    "tunesmith --help": ["--help"],
    "tunesmith sft --help": ["sft", "--help"],
    "tunesmith sft --lora_rnk 8 (error)": ["sft", "--lora_rnk", "8"],
}


def main(runs: int = 10) -> None:
    print(f"python {sys.version.split()[0]}, {runs} runs each (median / max, seconds)")
    for name, argv in CASES.items():
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tunesmith", *argv], capture_output=True)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"{name:<40} {med:.3f} / {max(times):.3f}  {'OK' if med < 0.5 else 'OVER 0.5 s'}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
