// How numbers from the run files are written on the page.

export const PALETTE = ["#2f6fde", "#e8590c", "#2b9a66", "#c2255c", "#7048e8", "#0c8599", "#a6761d", "#5c7080"];

export function isNumber(v) {
  return typeof v === "number" && Number.isFinite(v);
}

export function percent(v) {
  return isNumber(v) ? `${(v * 100).toFixed(2)}%` : "–";
}

export function decimal(v, digits = 4) {
  return isNumber(v) ? v.toFixed(digits) : "–";
}

export function duration(seconds) {
  if (!isNumber(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function ago(unixSeconds) {
  if (!isNumber(unixSeconds) || unixSeconds <= 0) return "";
  return `${duration(Date.now() / 1000 - unixSeconds)} ago`;
}

// An element with optional class, attributes and children (strings become text, never HTML).
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.setAttribute("style", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
