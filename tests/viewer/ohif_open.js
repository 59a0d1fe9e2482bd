// Open a URL of the built-in OHIF viewer with Debian's Chromium (playwright-core, no browser
// download) and report what the viewer did, as JSON on stdout: every DICOMweb request with
// its status, Authorization header and JSON body, console errors, failed viewer files, the viewport canvases' boxes and the
// page's final URL; plus a screenshot.
// usage: node ohif_open.js VIEWER_URL SCREENSHOT_PATH USER_DATA_DIR
const { chromium } = require('playwright-core');

(async () => {
  const [url, screenshot, userDataDir] = process.argv.slice(2);
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
           '--disable-background-networking', '--disable-component-update', '--disable-sync',
           '--no-first-run', '--disable-quic'],
  });
  const page = context.pages()[0] || await context.newPage();
  const requests = [];  // {url, status, authorization}
  const errors = [];
  const offOrigin = [];  // requests that left the viewer's origin
  const origin = new URL(url).origin;
  const pending = [];
  context.on('request', (r) => {
    if (!r.url().startsWith(origin) && !r.url().startsWith('data:') && !r.url().startsWith('blob:')) {
      offOrigin.push(r.url());
    }
  });
  const failedAssets = [];  // the viewer's own files that did not load
  context.on('response', (r) => {
    if (!r.url().includes('/dicom-web/')) {
      if (r.status() >= 400) failedAssets.push(`${r.status()} ${r.url()}`);
      return;
    }
    pending.push((async () => {
      const headers = await r.request().allHeaders().catch(() => ({}));
      const type = (await r.headerValue('content-type').catch(() => null)) || '';
      // JSON answers (QIDO, metadata) are kept, to check what data reached the browser.
      const body = type.includes('json') ? (await r.text().catch(() => '')).slice(0, 200000) : null;
      requests.push({
        url: r.url(), status: r.status(), authorization: headers.authorization || null, body,
      });
    })());
  });
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text().slice(0, 300)); });
  page.on('pageerror', (e) => errors.push(String(e).slice(0, 300)));
  const first = await page.goto(url, { waitUntil: 'load', timeout: 90000 });
  const redirected = first ? first.request().redirectedFrom() !== null : false;
  // The image arrives after the frames; a refused study never gets that far: stop once
  // frames were fetched, or ten seconds after DICOMweb started refusing.
  let refusedSince = null;
  for (let i = 0; i < 180; i++) {
    await Promise.all(pending);
    if (requests.some((r) => r.url.includes('/frames/') && r.status === 200)) break;
    if (requests.some((r) => r.status >= 400)) {
      refusedSince = refusedSince ?? Date.now();
      if (Date.now() - refusedSince > 10000) break;
    }
    await page.waitForTimeout(500);
  }
  await page.waitForLoadState('networkidle', { timeout: 60000 }).catch(() => {});
  await page.waitForTimeout(3000);
  await Promise.all(pending);
  const boxes = [];
  for (const canvas of await page.$$('.cornerstone-canvas, canvas')) {
    const box = await canvas.boundingBox();
    if (box && box.width > 100 && box.height > 100) boxes.push(box);
  }
  await page.screenshot({ path: screenshot });
  console.log(JSON.stringify({
    requests, errors, boxes, offOrigin, failedAssets, redirected, finalUrl: page.url(),
  }));
  await context.close();
})().catch((e) => { console.error(e); process.exit(1); });
