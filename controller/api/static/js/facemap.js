// The face map: face, neck and décolletage (and a body for the scar and stretch-mark
// plans) as an SVG, each zone of the session's plan showing its passes left and its depth
// limit; a tap selects a zone, a done zone is locked. Zones outside the plan are drawn
// faint and cannot be tapped.

const SVG = "http://www.w3.org/2000/svg";

// Shapes in the map's coordinates (viewBox 0 0 700 640); label: [x, y, anchor].
const FACE = { dx: 20 };
const SHAPES = {
  forehead: { paths: ["M95,140 Q100,48 230,38 Q360,48 365,140 Q230,118 95,140 Z"], label: [230, 82, "middle"] },
  periorbital: {
    paths: ["M120,172 a46,26 0 1,0 92,0 a46,26 0 1,0 -92,0 Z", "M248,172 a46,26 0 1,0 92,0 a46,26 0 1,0 -92,0 Z"],
    label: [392, 160, "start"],
  },
  nose: { paths: ["M215,188 L200,272 Q230,290 260,272 L245,188 Z"], label: [230, 226, "middle"] },
  cheeks: {
    paths: ["M92,214 Q104,300 160,334 L190,292 Q182,226 130,206 Z", "M368,214 Q356,300 300,334 L270,292 Q278,226 330,206 Z"],
    label: [150, 252, "middle"],
  },
  perioral: { paths: ["M170,334 a60,30 0 1,0 120,0 a60,30 0 1,0 -120,0 Z"], label: [230, 330, "middle"] },
  chin: { paths: ["M168,372 Q230,392 292,372 Q282,420 230,432 Q178,420 168,372 Z"], label: [230, 398, "middle"] },
  jawline: {
    paths: ["M78,258 Q92,372 168,430 L178,412 Q112,356 98,258 Z", "M382,258 Q368,372 292,430 L282,412 Q348,356 362,258 Z"],
    label: [-12, 372, "start"],
  },
  neck: { paths: ["M168,440 L292,440 L302,520 L158,520 Z"], label: [230, 474, "middle"] },
  decolletage: { paths: ["M60,630 Q74,532 158,522 L302,522 Q386,532 400,630 Z"], label: [230, 570, "middle"] },
  // The body (right): upper back and shoulders for scars, abdomen and hips for stretch marks.
  acne_scars: { paths: ["M500,150 Q560,128 620,150 L628,210 Q560,198 492,210 Z"], label: [560, 176, "middle"], body: true },
  stretch_marks: { paths: ["M505,290 L615,290 L630,400 Q560,420 490,400 Z"], label: [560, 338, "middle"], body: true },
};
const HEAD = "M230,26 Q380,30 388,210 Q392,360 300,420 Q262,444 230,446 Q198,444 160,420 Q68,360 72,210 Q80,30 230,26 Z";
const BODY = [
  "M560,60 a34,40 0 1,0 0.1,0 Z",
  "M540,106 L580,106 L584,130 Q640,138 650,170 L672,330 L648,334 L626,220 L632,420 Q560,440 488,420 L494,220 L472,334 L448,330 L470,170 Q480,138 536,130 Z",
];

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function limitsOf(zone) {
  const o = zone.override;
  return { depth: o ? o.max_depth_um : zone.policy_max_depth_um, passes: o ? o.max_passes : zone.policy_max_passes };
}

function mmText(um) {
  return (um / 1000).toFixed(2) + " mm";
}

// zones: the session's zones in plan order; selected: zone id; onSelect(zoneId);
// locked: why no zone may be chosen now (null if one may).
export function renderFaceMap(container, { zones, selected, onSelect, locked }) {
  const inPlan = new Map(zones.map((z) => [z.zone_id, z]));
  const body = zones.some((z) => SHAPES[z.zone_id] && SHAPES[z.zone_id].body);
  const svg = el("svg", {
    viewBox: body ? "-20 0 720 640" : "-20 0 490 640",
    class: "map-svg",
    role: "presentation",
  });
  const face = el("g", { transform: `translate(${FACE.dx},0)` }, svg);
  el("path", { d: HEAD, class: "outline" }, face);
  if (body) for (const d of BODY) el("path", { d, class: "outline" }, svg);
  for (const [zoneId, shape] of Object.entries(SHAPES)) {
    const zone = inPlan.get(zoneId);
    if (!zone && shape.body && !body) continue;
    const parent = shape.body ? svg : face;
    const g = el("g", { class: "zone", "data-zone": zoneId }, parent);
    for (const d of shape.paths) el("path", { d, class: "zone-shape" }, g);
    if (!zone) {
      g.classList.add("off-plan");
      continue;
    }
    const lim = limitsOf(zone);
    const left = Math.max(0, lim.passes - zone.passes_done);
    const done = left === 0;
    g.classList.add("in-plan");
    if (done) g.classList.add("done");
    if (zoneId === selected) g.classList.add("selected");
    if (zone.override) g.classList.add("overridden");
    const [x, y, anchor] = shape.label;
    const text = el("text", { x, y, "text-anchor": anchor, class: "zone-label" }, g);
    const lines = [zone.label, done ? "done" : `${left} of ${lim.passes} left`, `≤ ${mmText(lim.depth)}`];
    lines.forEach((line, i) => {
      const span = el("tspan", { x, dy: i === 0 ? 0 : 17, class: i === 0 ? "zone-name" : "zone-facts" }, text);
      span.textContent = line;
    });
    const what = `${zone.label}: ${done ? "all passes done" : `${left} of ${lim.passes} passes left`}, depth limit ${mmText(lim.depth)}`;
    g.setAttribute("role", "button");
    g.setAttribute("tabindex", done ? "-1" : "0");
    g.setAttribute("aria-label", what + (zoneId === selected ? ", selected" : ""));
    g.setAttribute("aria-pressed", zoneId === selected ? "true" : "false");
    g.dataset.left = String(left);
    g.dataset.limitUm = String(lim.depth);
    if (done || locked) g.setAttribute("aria-disabled", "true");
    const choose = () => {
      if (done) return;
      onSelect(zoneId, locked);
    };
    g.addEventListener("click", choose);
    g.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        choose();
      }
    });
  }
  container.replaceChildren(svg);
}
