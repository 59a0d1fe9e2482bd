// Open a study in the OHIF viewer with Debian's Chromium (playwright-core, no browser
// download) and report what the viewer shows: a screenshot, the viewport canvases' boxes,
// the DICOMweb requests it made and any console errors, as JSON on stdout.
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
  const requests = [];
  const errors = [];
  page.on('request', (r) => { if (r.url().includes('/dicom-web/')) requests.push(r.url()); });
  page.on('response', (r) => {
    if (r.url().includes('/dicom-web/') && r.status() >= 400) errors.push(`${r.status()} ${r.url()}`);
  });
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text().slice(0, 300)); });
  page.on('pageerror', (e) => errors.push(String(e).slice(0, 300)));
  await page.goto(url, { waitUntil: 'load', timeout: 90000 });
  // The viewport canvas appears once the layout is up; the image arrives after the frames.
  await page.waitForSelector('.cornerstone-canvas, canvas', { timeout: 90000 });
  let frames = 0;
  for (let i = 0; i < 120 && frames === 0; i++) {
    frames = requests.filter((u) => u.includes('/frames/')).length;
    await page.waitForTimeout(500);
  }
  await page.waitForLoadState('networkidle', { timeout: 60000 }).catch(() => {});
  await page.waitForTimeout(3000);
  const boxes = [];
  for (const canvas of await page.$$('.cornerstone-canvas, canvas')) {
    const box = await canvas.boundingBox();
    if (box && box.width > 100 && box.height > 100) boxes.push(box);
  }
  await page.screenshot({ path: screenshot });
  console.log(JSON.stringify({ requests, errors, boxes }));
  await context.close();
})().catch((e) => { console.error(e); process.exit(1); });
