// Small SVG charts for the console: columns over time and ranked bars. Colours come from
// classes in app.css; each bar has a <title> that shows its exact number on hover.

const SVG = "http://www.w3.org/2000/svg";
const numbers = new Intl.NumberFormat();
const compactFormat = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const small = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });
// Amounts below 1 (a spend in dollars) keep three significant digits instead of becoming 0.
const compact = { format: (v) => (v && Math.abs(v) < 1 ? small.format(v) : compactFormat.format(v)) };

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  if (text !== null) el.textContent = text;
  return el;
}

/** A round step for about `count` grid lines up to `max`; `whole`: at least 1 (counts). */
function niceStep(max, count = 4, whole = true) {
  const raw = (max > 0 ? max : 1) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw * (1 - 1e-9));
  return whole ? Math.max(1, step) : step;
}

/**
 * Columns per label, the series stacked: {labels, series: [{name, className, values, texts?}]}
 * (`texts`: each value as shown on hover, e.g. an exact amount; `whole`: false for amounts,
 * whose grid may step below 1). Returns an <svg> `width` pixels wide, so its text keeps its size.
 */
export function columnChart({ labels, series, width = 560, height = 220, whole = true }) {
  const right = 8, top = 10, bottom = 28;
  const totals = labels.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const step = niceStep(Math.max(0, ...totals), 4, whole);
  const top_value = Math.max(step, Math.ceil(Math.max(0, ...totals) / step) * step);
  const ticks = [];
  for (let line = 0; line * step <= top_value * (1 + 1e-9); line += 1) ticks.push(line * step);
  // Room for the longest grid label (small amounts are long: 0.000015).
  const left = Math.max(48, 10 + 7 * Math.max(...ticks.map((v) => compact.format(v).length)));
  const plotW = width - left - right, plotH = height - top - bottom;
  const y = (value) => top + plotH - (value / top_value) * plotH;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart-svg" });

  for (const value of ticks) {
    root.append(svg("line", { x1: left, x2: width - right, y1: y(value), y2: y(value), class: value ? "grid" : "axis" }));
    root.append(svg("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, compact.format(value)));
  }
  const slot = plotW / Math.max(labels.length, 1);
  const barW = Math.min(48, slot * 0.7);
  const every = Math.ceil(labels.length / 10); // at most ten labels under the axis
  labels.forEach((label, i) => {
    const x = left + slot * i + (slot - barW) / 2;
    let base = 0;
    for (const s of series) {
      const value = s.values[i] || 0;
      if (value > 0) {
        const rect = svg("rect", {
          x: x.toFixed(1), y: y(base + value).toFixed(1), width: barW.toFixed(1),
          height: Math.max(1, y(base) - y(base + value)).toFixed(1), class: s.className, rx: 2,
        });
        rect.append(svg("title", {}, `${label} · ${s.name}: ${s.texts ? s.texts[i] : numbers.format(value)}`));
        root.append(rect);
      }
      base += value;
    }
    if (i % every === 0) {
      root.append(svg("text", { x: (x + barW / 2).toFixed(1), y: height - 8, "text-anchor": "middle" }, label));
    }
  });
  return root;
}

/** Ranked horizontal bars: {labels, values, className}, largest first as given; `texts`: each
 * value as shown beside its bar (e.g. an exact amount), else rounded. */
export function barList({ labels, values, className, unit = "", width = 560, texts = null }) {
  const rowH = 26, labelW = Math.min(190, width * 0.38), valueW = texts ? 96 : 56;
  const height = Math.max(1, labels.length) * rowH + 4;
  const max = Math.max(0, ...values) || 1; // amounts may all be below 1
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "chart-svg" });
  labels.forEach((label, i) => {
    const y = i * rowH + 2;
    const fits = Math.floor(labelW / 6.6);
    const shown = label.length > fits ? `${label.slice(0, fits - 1)}…` : label;
    root.append(svg("text", { x: 0, y: y + rowH / 2 + 4 }, shown));
    const w = Math.max(2, ((width - labelW - valueW) * values[i]) / max);
    const rect = svg("rect", { x: labelW, y: y + 4, width: w.toFixed(1), height: rowH - 8, rx: 3, class: className });
    rect.append(svg("title", {}, `${label}: ${texts ? texts[i] : numbers.format(values[i])}${unit}`));
    root.append(rect);
    root.append(svg("text", { x: labelW + w + 6, y: y + rowH / 2 + 4, class: "value" }, texts ? texts[i] : compact.format(values[i])));
  });
  return root;
}
