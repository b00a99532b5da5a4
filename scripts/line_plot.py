"""A plain SVG line plot with a log2 x axis, shared by the scaling benchmarks
(scripts/bench-label-scaling.sh, scripts/bench-train-scaling.sh). Standard library only."""
import math

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def write_svg(path, curves, title, xlabel, ylabel, legend, dashed=lambda key: False, yfmt="{:.0f}"):
    """curves: {key: [(x, y), ...]}; legend(key) names a curve; dashed(key) draws it dashed."""
    W, H, L, R, T, B = 640, 400, 70, 170, 30, 50
    xs = sorted({x for c in curves.values() for x, _ in c})
    ymax = max(y for c in curves.values() for _, y in c) * 1.1

    def px(x):
        lo, hi = math.log2(xs[0]), math.log2(xs[-1])
        return L + (math.log2(x) - lo) / max(hi - lo, 1e-9) * (W - L - R)

    def py(y):
        return H - B - y / ymax * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W/2}" y="18" text-anchor="middle">{title}</text>',
           f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
           f'<text x="{(L + W - R)/2}" y="{H-12}" text-anchor="middle">{xlabel}</text>',
           f'<text x="16" y="{(T + H - B)/2}" transform="rotate(-90 16 {(T + H - B)/2})" text-anchor="middle">{ylabel}</text>']
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{H-B+16}" text-anchor="middle">{x}</text>')
    for i in range(6):
        y = ymax * i / 5
        out.append(f'<text x="{L-6}" y="{py(y)+4:.1f}" text-anchor="end">{yfmt.format(y)}</text>')
        out.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W-R}" y2="{py(y):.1f}" stroke="#ddd"/>')
    for i, key in enumerate(sorted(curves)):
        c = COLORS[i % len(COLORS)]
        dash = ' stroke-dasharray="6 4"' if dashed(key) else ""
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(curves[key]))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for x, y in sorted(curves[key]):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
        out.append(f'<text x="{W-R+10}" y="{T+20+18*i}" fill="{c}">{legend(key)}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def _self_test():
    """`python3 scripts/line_plot.py`: two curves on known points, checked in the written SVG."""
    import os
    import re
    import tempfile

    curves = {"a": [(128, 1.0), (1024, 2.0)], "b": [(128, 2.0), (512, 0.5), (1024, 1.0)]}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plot.svg")
        write_svg(path, curves, "t", "x", "y", legend=str, dashed=lambda k: k == "b")
        svg = open(path).read()
    lines = re.findall(r'<polyline points="([^"]+)"', svg)
    assert len(lines) == 2, lines
    first = [tuple(map(float, p.split(","))) for p in lines[0].split()]
    # x: log2 axis from 128 (left, 70) to 1024 (right, 640 - 170); y: 0 at 350, ymax = 2.2.
    want = [(70.0, 350 - 1.0 / 2.2 * 320), (470.0, 350 - 2.0 / 2.2 * 320)]
    assert all(abs(x - y) < 0.06 for p, q in zip(first, want) for x, y in zip(p, q)), first
    second = [tuple(map(float, p.split(","))) for p in lines[1].split()]
    assert abs(second[1][0] - (70 + 2 / 3 * 400)) < 0.06, second  # 512 is 2/3 of the way in log2
    assert svg.count("stroke-dasharray") == 1 and svg.count("<circle") == 5
    print("line_plot: ok")


if __name__ == "__main__":
    _self_test()
