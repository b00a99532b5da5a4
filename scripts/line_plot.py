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
