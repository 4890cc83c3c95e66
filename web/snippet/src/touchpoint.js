// Touchpoint browser snippet: page views with their Core Web Vitals (LCP, INP, CLS from the web-vitals
// library), task outcomes and identify calls, batched and sent to the collector with navigator.sendBeacon.
//
// <script async src="https://collector.example/v1/snippet.js" data-key="tpk_..." data-flow="checkout"></script>
// touchpoint.task("transfer", "SUCCESS", {duration_ms: 5200});   // or: const t = touchpoint.start("transfer"); t.success()
// touchpoint.identify({user_id: "u-42"});
import { onCLS, onINP, onLCP } from 'web-vitals';

const script = document.currentScript;
const data = (name, fallback) => (script && script.getAttribute('data-' + name)) || fallback;
const key = data('key', '');
const origin = script && script.src ? new URL(script.src).origin : location.origin;
const endpoint = data('endpoint', origin + '/v1/touchpoints') + '?key=' + encodeURIComponent(key);
const channel = data('channel', 'WEB');
const flushMs = Number(data('flush-ms', '5000'));
const maxBatch = 50;

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 15) | 64;
  b[8] = (b[8] & 63) | 128;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
}

function stored(storage, name) {
  try {
    let value = storage.getItem(name);
    if (!value) {
      value = uuid();
      storage.setItem(name, value);
    }
    return value;
  } catch (e) {
    return uuid(); // storage blocked: an id for this page only
  }
}

function deviceClass() {
  const ua = navigator.userAgent;
  const narrow = Math.min(screen.width, screen.height);
  if (/iPad|Tablet|PlayBook|Silk/i.test(ua) || (/Android/i.test(ua) && !/Mobile/i.test(ua))) return 'TABLET';
  if (/Mobi|iPhone|iPod|Android|IEMobile|Opera Mini/i.test(ua) || narrow < 480) return 'MOBILE';
  if (navigator.maxTouchPoints > 1 && narrow < 900) return 'TABLET';
  return 'DESKTOP';
}

const ids = { anonymous_id: stored(localStorage, 'tp_aid') };
try {
  const known = JSON.parse(localStorage.getItem('tp_ids') || '{}');
  for (const k of ['user_id', 'customer_id']) if (known[k]) ids[k] = known[k];
} catch (e) { /* unreadable: start again */ }
const session = stored(sessionStorage, 'tp_sid');
const device = deviceClass();
const flow = data('flow', null);
const appVersion = data('app-version', null);
let queue = [];
let timer = null;

function base(eventType, fields) {
  const event = {
    event_id: uuid(), event_time: Date.now(), channel: channel, event_type: eventType,
    identifiers: Object.assign({}, ids), session_id: session, device_class: device, flow: flow,
    attributes: { path: location.pathname },
  };
  if (appVersion) event.app_version = appVersion;
  return Object.assign(event, fields || {});
}

function send(batch) {
  const body = JSON.stringify(batch);
  // A plain string is sent as text/plain: a CORS-safelisted type, so there is no preflight.
  if (navigator.sendBeacon && navigator.sendBeacon(endpoint, body)) return;
  fetch(endpoint, { method: 'POST', body: body, keepalive: true, mode: 'cors' }).catch(() => {});
}

function flush() {
  if (timer) {
    clearTimeout(timer);
    timer = null;
  }
  while (queue.length) send(queue.splice(0, maxBatch));
}

function enqueue(event) {
  queue.push(event);
  if (queue.length >= maxBatch) flush();
  else if (!timer) timer = setTimeout(flush, flushMs);
}

// The page view waits for its vitals and leaves when the page is hidden (or left).
const vitals = {};
const nav = performance.getEntriesByType && performance.getEntriesByType('navigation')[0];
const pageView = base('page_view', { event_time: Math.round(performance.timeOrigin || Date.now()) });
pageView.attributes.referrer = document.referrer || '';
let pageViewSent = false;
onLCP((m) => { vitals.lcp_ms = m.value; }, { reportAllChanges: true });
onINP((m) => { vitals.inp_ms = m.value; }, { reportAllChanges: true });
onCLS((m) => { vitals.cls = m.value; }, { reportAllChanges: true });

function leave() {
  if (!pageViewSent) {
    pageViewSent = true;
    if (nav && nav.loadEventEnd > 0) pageView.duration_ms = Math.round(nav.loadEventEnd);
    pageView.web_vitals = {
      lcp_ms: vitals.lcp_ms === undefined ? null : vitals.lcp_ms,
      inp_ms: vitals.inp_ms === undefined ? null : vitals.inp_ms,
      cls: vitals.cls === undefined ? null : vitals.cls,
    };
    queue.unshift(pageView);
  }
  flush();
}
// Registered after web-vitals' own listeners, so their final values are in before the page view leaves.
addEventListener('visibilitychange', () => { if (document.visibilityState === 'hidden') leave(); }, true);
addEventListener('pagehide', leave, true);

function task(flowName, outcome, fields) {
  const extra = Object.assign({ flow: flowName || flow, outcome: outcome }, fields || {});
  if (outcome === 'FAILURE' && !extra.error_code) extra.error_code = 'unspecified';
  enqueue(base('task', extra));
}

window.touchpoint = {
  task: task,
  start(flowName) {
    const started = performance.now();
    const end = (outcome, fields) => task(flowName, outcome,
      Object.assign({ duration_ms: Math.round(performance.now() - started) }, fields || {}));
    return {
      success: (fields) => end('SUCCESS', fields),
      failure: (errorCode, fields) => end('FAILURE', Object.assign({ error_code: errorCode || 'unspecified' }, fields)),
      abandon: (fields) => end('ABANDONED', fields),
    };
  },
  identify(known) {
    for (const k of ['user_id', 'customer_id']) if (known && known[k]) ids[k] = String(known[k]);
    try { localStorage.setItem('tp_ids', JSON.stringify({ user_id: ids.user_id, customer_id: ids.customer_id })); } catch (e) { /* ignore */ }
    enqueue(base('identify'));
  },
  track(eventType, fields) { enqueue(base(eventType, fields)); },
  flush: leave,
};
