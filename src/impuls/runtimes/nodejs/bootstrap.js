// Impuls runtime client for Node.js: speaks the Lambda Runtime API (2018-06-01).
//
// The host starts this file as `node bootstrap.js` with cwd = LAMBDA_TASK_ROOT. It loads the
// handler named by _HANDLER once (CommonJS or ES module), then loops: GET .../invocation/next,
// call the handler, POST the result (or the error) back. HTTP/1.1 is spoken by hand over one
// persistent net.Socket (TCP to AWS_LAMBDA_RUNTIME_API, or the unix socket named by
// IMPULS_RUNTIME_API_SOCKET): node's http client costs more per request and at start-up.
//
// Semantics follow Lambda's Node.js runtime (aws-lambda-nodejs-runtime-interface-client):
// - a returned promise settles the invocation as soon as it settles;
// - otherwise the invocation waits for callback(err, result); with
//   context.callbackWaitsForEmptyEventLoop (default true) the response is sent once the event
//   loop has nothing else to do; a handler that neither returns a promise nor calls back gets a
//   null response when the event loop empties;
// - context.succeed/fail/done respond immediately;
// - an uncaught exception or unhandled rejection reports an error for the current invocation
//   (or init) and ends the process with exit code 129;
// - response streaming: a handler wrapped by the global awslambda.streamifyResponse(handler) is
//   called as handler(event, responseStream, context) and its response is streamed (see
//   "Response streaming" below); awslambda.HttpResponseStream.from(responseStream, {statusCode,
//   headers, cookies}) starts the body with the HTTP integration prelude.
'use strict';

const net = require('net');
const fs = require('fs');
const path = require('path');

const env = process.env;
const RUNTIME = '/2018-06-01/runtime';

// ------------------------------------------------------------------------------------------
// Started ahead of time (the namespace sandbox's pre-started slots): node started before its
// function was known, with a neutral environment. Wait, blocking, for the assignment on the
// descriptor IMPULS_PRESTART_FD names -- one message, JSON {env, cwd} -- then take on exactly
// the function's environment and working directory before anything reads them. Functions
// that set variables node reads only at its own start (NODE_*, UV_*) are never started so.

function takeAssignment(fd) {
  const buf = Buffer.allocUnsafe(256 * 1024);
  let n = 0;
  for (;;) {
    try {
      n = fs.readSync(fd, buf, 0, buf.length, null);
      break;
    } catch (err) {
      if (err.code !== 'EINTR' && err.code !== 'EAGAIN') throw err;
    }
  }
  if (n === 0) process.exit(0); // the slot was given up
  fs.closeSync(fd);
  const assignment = JSON.parse(buf.toString('utf8', 0, n));
  for (const key of Object.keys(env)) delete env[key];
  Object.assign(env, assignment.env);
  process.chdir(assignment.cwd);
  const Module = require('module');
  if (typeof Module._initPaths === 'function') Module._initPaths(); // HOME, NODE_PATH
}

if (env.IMPULS_PRESTART_FD) takeAssignment(Number(env.IMPULS_PRESTART_FD));

// ------------------------------------------------------------------------------------------
// Each call's trace id in process.env._X_AMZN_TRACE_ID, without setenv(): glibc keeps every
// value setenv() was ever given (a pointer getenv() returned must stay valid), so a new id
// per call grew the process by ~90 bytes a call. process.env becomes a proxy of the real
// environment that keeps that one name in a variable; every other name is the real
// environment's (TZ and the rest keep their effects). Native code calling getenv() does not
// see the id; a child process started with the default environment does (child_process
// copies process.env).

const TRACE = '_X_AMZN_TRACE_ID';
let traceId = env[TRACE];
delete env[TRACE];
const traceDescriptor = () => (traceId === undefined ? undefined
  : { value: traceId, writable: true, enumerable: true, configurable: true });
process.env = new Proxy(env, {
  get: (target, key) => (key === TRACE ? traceId : Reflect.get(target, key)),
  set: (target, key, value) => {
    if (key !== TRACE) return Reflect.set(target, key, value);
    traceId = String(value);
    return true;
  },
  has: (target, key) => (key === TRACE ? traceId !== undefined : Reflect.has(target, key)),
  deleteProperty: (target, key) => {
    if (key !== TRACE) return Reflect.deleteProperty(target, key);
    traceId = undefined;
    return true;
  },
  ownKeys: (target) => (traceId === undefined ? Reflect.ownKeys(target)
    : [...Reflect.ownKeys(target), TRACE]),
  getOwnPropertyDescriptor: (target, key) => (key === TRACE ? traceDescriptor()
    : Reflect.getOwnPropertyDescriptor(target, key)),
  defineProperty: (target, key, descriptor) => {
    if (key !== TRACE) return Reflect.defineProperty(target, key, descriptor);
    traceId = String(descriptor.value);
    return true;
  },
});

// ------------------------------------------------------------------------------------------
// Logs: the host reads our stdout/stderr pipes after it gets a response, so everything written
// before a POST must already be in the pipe. Node writes to pipes asynchronously; make them
// blocking (files and TTYs are synchronous already). process.stdout/stderr are created lazily
// (about 0.5 ms for a pipe): wrap their getters so that the stream is made blocking the moment
// it first comes into existence, and not created at all for a function that never logs.

const streams = { stdout: null, stderr: null };
for (const name of ['stdout', 'stderr']) {
  const descriptor = Object.getOwnPropertyDescriptor(process, name);
  const makeBlocking = (stream) => {
    const handle = stream && stream._handle;
    if (handle && typeof handle.setBlocking === 'function') handle.setBlocking(true);
    streams[name] = stream;
    return stream;
  };
  if (descriptor && typeof descriptor.get === 'function' && descriptor.configurable) {
    const get = descriptor.get;
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: descriptor.enumerable,
      get() {
        const stream = get.call(process);
        return stream === streams[name] ? stream : makeBlocking(stream);
      },
    });
  } else {
    makeBlocking(process[name]);
  }
}

function logError(text) {
  try {
    process.stderr.write(text + '\n');
  } catch (_) {
    // nowhere to report it
  }
}

// Calls fn once stdout and stderr have nothing queued (normally at once: they block).
function whenFlushed(fn) {
  const { stdout, stderr } = streams;
  if (stdout !== null && stdout.writableLength > 0) stdout.once('drain', () => whenFlushed(fn));
  else if (stderr !== null && stderr.writableLength > 0) {
    stderr.once('drain', () => whenFlushed(fn));
  } else fn();
}

// ------------------------------------------------------------------------------------------
// HTTP/1.1 over one persistent socket. One request at a time: request(data, cb) sends a
// complete request (head and body in one write) and calls cb(status, headers, body: Buffer).

const unixPath = env.IMPULS_RUNTIME_API_SOCKET || '';
delete env.IMPULS_RUNTIME_API_SOCKET;
const api = env.AWS_LAMBDA_RUNTIME_API || '';
const HOST = unixPath || !api ? 'localhost' : api; // the Host header
let apiHost = api.slice(0, api.lastIndexOf(':'));
const apiPort = Number(api.slice(api.lastIndexOf(':') + 1));
if (apiHost.startsWith('[')) apiHost = apiHost.slice(1, -1);

const HEAD_END = Buffer.from('\r\n\r\n');
const EMPTY = Buffer.alloc(0);

let sock = null;
let refd = true; // false while we wait for the event loop to empty
let pendingCb = null;
let pendingReq = null;
let attempts = 0;
let rbuf = null; // received bytes not yet consumed
let resStatus = 0; // response being read: status, headers, and body state
let resHeaders = null;
let bodyMode = 0; // 0: reading head, 1: fixed length, 2: chunked, 3: until close
let bodyNeed = 0;
let bodyParts = null;
let bodyHave = 0;

function connect() {
  const s = unixPath ? net.createConnection(unixPath) : net.createConnection(apiPort, apiHost);
  s.setNoDelay(true);
  s.on('data', (chunk) => {
    if (s === sock) onData(chunk);
  });
  s.on('error', () => {}); // 'close' follows
  s.on('close', () => onClose(s));
  sock = s;
  rbuf = null;
  bodyMode = 0;
}

function request(data, cb) {
  pendingCb = cb;
  pendingReq = data;
  attempts = 0;
  send();
}

function send() {
  if (sock === null) connect();
  else if (!refd) {
    sock.ref();
    refd = true;
  }
  sock.write(pendingReq);
}

function onClose(s) {
  if (s !== sock) return;
  sock = null;
  if (streaming !== null) { // half a streamed request cannot be sent again on a new connection
    logError('impuls runtime: lost the connection to the Runtime API while streaming, exiting');
    process.exit(1);
  }
  if (pendingCb === null) return;
  if (bodyMode === 3) {
    bodyMode = 0;
    const body = rbuf === null ? EMPTY : rbuf;
    rbuf = null;
    complete(body);
    return;
  }
  if (++attempts > 3) {
    logError('impuls runtime: lost the connection to the Runtime API, exiting');
    process.exit(1);
  }
  refd = true;
  setTimeout(send, 20 * (attempts - 1)); // first retry at once: a dropped keep-alive
}

function onData(chunk) {
  if (bodyMode === 1) {
    bodyParts.push(chunk);
    bodyHave += chunk.length;
    if (bodyHave < bodyNeed) return;
    const all = Buffer.concat(bodyParts, bodyHave);
    bodyParts = null;
    bodyMode = 0;
    rbuf = bodyHave > bodyNeed ? all.subarray(bodyNeed) : null;
    complete(all.subarray(0, bodyNeed));
    return;
  }
  rbuf = rbuf === null ? chunk : Buffer.concat([rbuf, chunk]);
  if (bodyMode === 2) readChunked();
  else if (bodyMode === 0) readHead();
}

function readHead() {
  if (pendingCb === null) return;
  const buf = rbuf;
  const end = buf.indexOf(HEAD_END);
  if (end < 0) return;
  const head = buf.toString('latin1', 0, end);
  const headers = {};
  let pos = head.indexOf('\r\n');
  resStatus = Number(head.slice(9, 12));
  while (pos >= 0) {
    const next = head.indexOf('\r\n', pos + 2);
    const line = next < 0 ? head.slice(pos + 2) : head.slice(pos + 2, next);
    const colon = line.indexOf(':');
    if (colon > 0) {
      headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
    }
    pos = next;
  }
  resHeaders = headers;
  const start = end + 4;
  const length = headers['content-length'];
  if (length !== undefined) {
    const need = Number(length);
    if (buf.length - start >= need) {
      rbuf = buf.length - start > need ? buf.subarray(start + need) : null;
      complete(buf.subarray(start, start + need));
    } else {
      bodyMode = 1;
      bodyNeed = need;
      bodyParts = [buf.subarray(start)];
      bodyHave = buf.length - start;
      rbuf = null;
    }
  } else if (/chunked/i.test(headers['transfer-encoding'] || '')) {
    bodyMode = 2;
    rbuf = buf.subarray(start);
    readChunked();
  } else if (resStatus < 200 || resStatus === 204 || resStatus === 304) {
    rbuf = buf.length > start ? buf.subarray(start) : null;
    complete(EMPTY);
  } else {
    bodyMode = 3; // the body runs until the server closes the connection
    rbuf = buf.length > start ? buf.subarray(start) : null;
  }
}

// Decodes a chunked body once it has fully arrived (rare: the host sends Content-Length).
function readChunked() {
  const buf = rbuf;
  const parts = [];
  let pos = 0;
  for (;;) {
    const eol = buf.indexOf('\r\n', pos, 'latin1');
    if (eol < 0) return;
    const size = parseInt(buf.toString('latin1', pos, eol), 16);
    pos = eol + 2;
    if (size === 0) {
      for (;;) {
        const end = buf.indexOf('\r\n', pos, 'latin1');
        if (end < 0) return;
        const blank = end === pos;
        pos = end + 2;
        if (blank) {
          bodyMode = 0;
          rbuf = pos < buf.length ? buf.subarray(pos) : null;
          complete(Buffer.concat(parts));
          return;
        }
      }
    }
    if (buf.length < pos + size + 2) return;
    parts.push(buf.subarray(pos, pos + size));
    pos += size + 2;
  }
}

function complete(body) {
  const cb = pendingCb;
  const status = resStatus;
  const headers = resHeaders;
  pendingCb = null;
  pendingReq = null;
  resHeaders = null;
  if (/close/i.test(headers.connection || '') && sock !== null) {
    sock.destroy();
    sock = null;
  }
  cb(status, headers, body);
}

function post(pathAndQuery, body, extraHeaders, cb) {
  request(
    'POST ' + pathAndQuery + ' HTTP/1.1\r\nHost: ' + HOST +
      '\r\nContent-Type: application/json\r\n' + extraHeaders +
      'Content-Length: ' + Buffer.byteLength(body) + '\r\n\r\n' + body,
    (status) => {
      if (status < 200 || status > 299) {
        logError('impuls runtime: POST ' + pathAndQuery + ' answered HTTP ' + status);
      }
      cb();
    },
  );
}

// ------------------------------------------------------------------------------------------
// Errors

function isErrorLike(err) {
  return (
    err instanceof Error ||
    (err !== null && typeof err === 'object' && typeof err.message === 'string' &&
      typeof err.name === 'string')
  );
}

function stackLines(err) {
  try {
    return typeof err.stack === 'string' ? err.stack.split('\n') : [];
  } catch (_) {
    return [];
  }
}

// {errorType, errorMessage, stackTrace} for anything a handler can throw or call back with.
function errorBody(err) {
  try {
    if (isErrorLike(err)) {
      return {
        errorType: String(err.name),
        errorMessage: String(err.message),
        stackTrace: stackLines(err),
      };
    }
    let text;
    if (typeof err === 'string') text = err;
    else {
      try {
        text = JSON.stringify(err);
      } catch (_) {
        // fall through to String()
      }
      if (typeof text !== 'string') text = String(err);
    }
    return { errorType: typeof err, errorMessage: text, stackTrace: [] };
  } catch (_) {
    return {
      errorType: 'Runtime.UnknownError',
      errorMessage: 'unable to describe the error value',
      stackTrace: [],
    };
  }
}

function postError(pathAndQuery, body, cb) {
  const json = JSON.stringify(body);
  logError(
    (pathAndQuery.endsWith('/init/error') ? 'Init Error ' : 'Invoke Error ') + json,
  );
  const type = String(body.errorType).replace(/[^\x20-\x7e]/g, '?');
  whenFlushed(() => post(pathAndQuery, json, 'Lambda-Runtime-Function-Error-Type: ' + type +
    '\r\n', cb));
}

// ------------------------------------------------------------------------------------------
// Response streaming
//
// awslambda.streamifyResponse(handler) marks a handler as streaming (as Lambda's Node.js runtime
// does, with the same symbol): it is called as handler(event, responseStream, context), where
// responseStream is a stream.Writable with setContentType(type). Its response is one POST
// .../response with Lambda-Runtime-Function-Response-Mode: streaming and Transfer-Encoding:
// chunked: the head goes with the first write (or the end), each write is sent as one chunk as
// soon as it is made (the write callback, and so 'drain', waits for the socket: back-pressure),
// and the last chunk ends it. An error after the stream was opened (the handler throws or
// rejects, destroys the stream, or the process crashes) ends it with the trailers
// Lambda-Runtime-Function-Error-Type and Lambda-Runtime-Function-Error-Body (base64 of the error
// document). The invocation is over when the handler's promise has settled and the host has
// answered the POST; a stream the handler left open when its promise resolved is ended for it.
//
// awslambda.HttpResponseStream.from(responseStream, prelude) sets the Content-Type to
// application/vnd.awslambda.http-integration-response and, before the first byte of the body
// (or at the end, if nothing is written), sends JSON.stringify(prelude) and 8 NUL bytes.

const HANDLER_STREAMING = Symbol.for('aws.lambda.runtime.handler.streaming');
const HANDLER_HIGHWATERMARK = Symbol.for('aws.lambda.runtime.handler.streaming.highWaterMark');
const STREAM_RESPONSE = 'response';
const HTTP_INTEGRATION = 'application/vnd.awslambda.http-integration-response';
const PRELUDE_DELIMITER = 8;
const CRLF = Buffer.from('\r\n');
const LAST_CHUNK = Buffer.from('0\r\n\r\n');

let streaming = null; // the invocation whose streamed POST is on the wire and not yet answered

function streamifyResponse(fn, options) {
  if (typeof fn !== 'function') throw new TypeError('awslambda.streamifyResponse expects a function');
  fn[HANDLER_STREAMING] = STREAM_RESPONSE;
  const hwm = options && options.highWaterMark;
  if (Number.isInteger(hwm) && hwm > 0) fn[HANDLER_HIGHWATERMARK] = hwm;
  return fn;
}

class HttpResponseStream {
  static from(responseStream, prelude) {
    responseStream.setContentType(HTTP_INTEGRATION);
    const metadata = JSON.stringify(prelude === undefined ? {} : prelude); // JSON holds no NUL
    responseStream._onBeforeFirstWrite = (write) => {
      write(metadata);
      write(new Uint8Array(PRELUDE_DELIMITER));
    };
    return responseStream;
  }
}

if (env.AWS_LAMBDA_NODEJS_NO_GLOBAL_AWSLAMBDA !== '1' &&
    env.AWS_LAMBDA_NODEJS_NO_GLOBAL_AWSLAMBDA !== 'true') {
  global.awslambda = { streamifyResponse, HttpResponseStream };
}

function toBuffer(data) {
  if (typeof data === 'string') return Buffer.from(data);
  if (Buffer.isBuffer(data)) return data;
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

// Appends data as one chunk of the chunked body (an empty chunk would end the body: skipped).
function pushChunk(parts, data) {
  const buf = toBuffer(data);
  if (buf.length === 0) return;
  parts.push(Buffer.from(buf.length.toString(16) + '\r\n', 'latin1'), buf, CRLF);
}

// Appends the head of the streamed POST and, unless the stream fails, the prelude hook's bytes.
function openStream(inv, parts, withPrelude) {
  const rs = inv.stream;
  inv.headSent = true;
  streaming = inv;
  const type = String(rs._contentType).replace(/[^\x20-\x7e]/g, '');
  parts.push(Buffer.from('POST ' + RUNTIME + '/invocation/' + inv.id + '/response HTTP/1.1\r\n' +
    'Host: ' + HOST + '\r\nLambda-Runtime-Function-Response-Mode: streaming\r\n' +
    'Transfer-Encoding: chunked\r\n' +
    'Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n' +
    'Content-Type: ' + type + '\r\n\r\n', 'latin1'));
  const hook = rs._onBeforeFirstWrite;
  rs._onBeforeFirstWrite = undefined;
  if (withPrelude && typeof hook === 'function') hook((data) => pushChunk(parts, data));
}

function sockWrite(data, cb) {
  if (sock === null) connect();
  else if (!refd) {
    sock.ref();
    refd = true;
  }
  sock.write(data, () => cb());
}

// Sends chunks as they are written (the Writable's _write/_writev).
function streamChunks(inv, chunks, cb) {
  if (inv.streamEnded) { // an error already ended the stream: later writes go nowhere
    cb();
    return;
  }
  const parts = [];
  if (!inv.headSent) openStream(inv, parts, true);
  for (const chunk of chunks) pushChunk(parts, chunk);
  if (parts.length === 0) cb();
  else sockWrite(Buffer.concat(parts), cb);
}

// Ends the stream: the last chunk, or the error trailers for body ({errorType, ...}). Returns
// false when it had already ended.
function streamEnd(inv, body) {
  if (inv.streamEnded) return false;
  inv.streamEnded = true;
  const parts = [];
  if (!inv.headSent) openStream(inv, parts, body === null);
  if (body === null) parts.push(LAST_CHUNK);
  else {
    const type = String(body.errorType).replace(/[^\x20-\x7e]/g, '?');
    parts.push(Buffer.from('0\r\nLambda-Runtime-Function-Error-Type: ' + type +
      '\r\nLambda-Runtime-Function-Error-Body: ' +
      Buffer.from(JSON.stringify(body)).toString('base64') + '\r\n\r\n', 'latin1'));
  }
  const data = Buffer.concat(parts);
  whenFlushed(() => request(data, (status) => streamPosted(inv, status)));
  return true;
}

function streamPosted(inv, status) {
  if (streaming === inv) streaming = null;
  if (status < 200 || status > 299) {
    logError('impuls runtime: POST /invocation/response answered HTTP ' + status);
  }
  inv.posted = true;
  if (inv.onPosted !== null) inv.onPosted();
  else streamDone(inv);
}

function streamDone(inv) {
  if (inv.done || crashing || !inv.settled || !inv.posted) return;
  inv.done = true;
  if (current === inv) current = null;
  next();
}

let ResponseStream = null; // the class, made on first use (stream.Writable)

function newResponseStream(inv, highWaterMark) {
  if (ResponseStream === null) {
    const { Writable } = require('stream');
    ResponseStream = class extends Writable {
      constructor(owner, hwm) {
        super(hwm ? { highWaterMark: hwm } : {});
        this._inv = owner;
        this._contentType = 'application/octet-stream';
        this._onBeforeFirstWrite = undefined;
        this.on('error', () => {}); // a failed stream is reported in its trailers
      }

      setContentType(type) {
        if (this._inv.headSent) {
          throw fault('Runtime.InvalidStreamingOperation', 'Cannot set content-type, too late.');
        }
        this._contentType = String(type);
      }

      write(chunk, encoding, cb) {
        // like Lambda's: what is neither a string nor bytes is written as JSON
        if (chunk !== null && chunk !== undefined && typeof chunk !== 'string' &&
            !(chunk instanceof Uint8Array)) chunk = JSON.stringify(chunk);
        return super.write(chunk, encoding, cb);
      }

      _write(chunk, encoding, cb) {
        streamChunks(this._inv, [chunk], cb);
      }

      _writev(entries, cb) {
        streamChunks(this._inv, entries.map((entry) => entry.chunk), cb);
      }

      _final(cb) {
        streamEnd(this._inv, null);
        cb();
      }

      _destroy(err, cb) {
        if (!this._inv.streamEnded) {
          const body = err ? errorBody(err) : {
            errorType: 'Runtime.StreamDestroyed', errorMessage: 'the response stream was destroyed',
            stackTrace: [] };
          logError('Invoke Error ' + JSON.stringify(body));
          streamEnd(this._inv, body);
        }
        cb(err);
      }
    };
  }
  return new ResponseStream(inv, highWaterMark);
}

function runStreaming(inv, event, context) {
  const rs = newResponseStream(inv, handler[HANDLER_HIGHWATERMARK]);
  inv.stream = rs;
  let ret;
  try {
    ret = handler(event, rs, context);
  } catch (err) {
    streamSettled(inv, err);
    return;
  }
  if (ret !== null && (typeof ret === 'object' || typeof ret === 'function') &&
      typeof ret.then === 'function') {
    ret.then(
      () => streamSettled(inv, null),
      (err) => streamSettled(inv, err === undefined || err === null ? 'handled' : err),
    );
  } else if (rs.writableEnded || inv.streamEnded) {
    streamSettled(inv, null);
  } else {
    streamSettled(inv, fault('Runtime.InvalidStreamingOperation',
      'Streaming does not support non-async handlers.'));
  }
}

// The handler settled: fail the stream with err, or end it if the handler left it open.
function streamSettled(inv, err) {
  if (inv.settled || crashing) return;
  inv.settled = true;
  if (err !== null) {
    const body = err && err.impulsBody ? err.impulsBody : errorBody(err);
    logError('Invoke Error ' + JSON.stringify(body));
    streamEnd(inv, body); // too late (the stream had ended): logged only
  } else if (!inv.stream.writableEnded && !inv.streamEnded) {
    inv.stream.end();
  }
  streamDone(inv);
}

// ------------------------------------------------------------------------------------------
// Handler loading ("init")

// An error whose report is fixed (Runtime.* types raised by this file).
function fault(errorType, message) {
  const e = new Error(message);
  e.name = errorType;
  e.impulsBody = { errorType, errorMessage: message, stackTrace: [] };
  return e;
}

function isFile(p) {
  try {
    return fs.statSync(p).isFile();
  } catch (_) {
    return false;
  }
}

// Like Lambda: a .js file is an ES module when the nearest package.json says "type": "module".
function isEsmPackage(file) {
  let dir = path.dirname(file);
  for (;;) {
    let text = null;
    try {
      text = fs.readFileSync(path.join(dir, 'package.json'), 'utf8');
    } catch (_) {
      // no package.json here
    }
    if (text !== null) {
      try {
        return JSON.parse(text).type === 'module';
      } catch (_) {
        return false;
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir || path.basename(dir) === 'node_modules') return false;
    dir = parent;
  }
}

function importFile(file) {
  return import(require('url').pathToFileURL(file).href);
}

// Returns {exports} for a CommonJS module or {esm: promise of the namespace} for an ES module.
function loadModule(root, modulePath) {
  const base = path.resolve(root, modulePath);
  // Lambda's order: the file as named, then .js, .mjs, .cjs; then node's own resolution.
  if (isFile(base)) return { exports: require(base) };
  if (isFile(base + '.js')) {
    if (isEsmPackage(base + '.js')) return { esm: importFile(base + '.js') };
    return { exports: require(base + '.js') };
  }
  if (isFile(base + '.mjs')) return { esm: importFile(base + '.mjs') };
  if (isFile(base + '.cjs')) return { exports: require(base + '.cjs') };
  return { exports: require(require.resolve(modulePath, { paths: [root] })) };
}

function loadError(err) {
  if (err && err.impulsBody) return err.impulsBody;
  if (err instanceof SyntaxError || (err && err.name === 'SyntaxError')) {
    return { errorType: 'Runtime.UserCodeSyntaxError', errorMessage: String(err),
      stackTrace: stackLines(err) };
  }
  if (err && (err.code === 'MODULE_NOT_FOUND' || err.code === 'ERR_MODULE_NOT_FOUND')) {
    return { errorType: 'Runtime.ImportModuleError', errorMessage: String(err),
      stackTrace: stackLines(err) };
  }
  return errorBody(err);
}

function resolveHandler(moduleObject, handlerPath, fullName) {
  let fn = moduleObject;
  for (const key of handlerPath.split('.')) fn = fn === null || fn === undefined ? fn : fn[key];
  if (fn === undefined || fn === null) {
    throw fault('Runtime.HandlerNotFound', fullName + ' is undefined or not exported');
  }
  if (typeof fn !== 'function') {
    throw fault('Runtime.HandlerNotFound', fullName + ' is not a function');
  }
  return fn;
}

// ------------------------------------------------------------------------------------------
// Invocations

const FUNCTION_NAME = env.AWS_LAMBDA_FUNCTION_NAME;
const FUNCTION_VERSION = env.AWS_LAMBDA_FUNCTION_VERSION;
const MEMORY_SIZE = env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE;
const LOG_GROUP = env.AWS_LAMBDA_LOG_GROUP_NAME;
const LOG_STREAM = env.AWS_LAMBDA_LOG_STREAM_NAME;
const NEXT = Buffer.from(
  'GET ' + RUNTIME + '/invocation/next HTTP/1.1\r\nHost: ' + HOST + '\r\n\r\n', 'latin1');
const RESPONSE_HEAD = ' HTTP/1.1\r\nHost: ' + HOST + '\r\nContent-Type: application/json\r\n';

let handler = null;
let initializing = true;
let crashing = false;
let current = null; // the invocation in progress, until its outcome is being posted

class Invocation {
  constructor(id) {
    this.id = id;
    this.done = false; // outcome decided (posting or posted)
    this.waiting = false; // handler returned without a promise: respond when the loop empties
    this.called = false; // callback already called (the first call wins)
    this.err = null;
    this.result = undefined;
    this.stream = null; // streaming handlers: the response stream, and its progress
    this.headSent = false;
    this.streamEnded = false;
    this.settled = false;
    this.posted = false;
    this.onPosted = null;
  }
}

function parseHeaderJson(value) {
  if (value === undefined) return undefined;
  try {
    return JSON.parse(value);
  } catch (_) {
    return undefined;
  }
}

// Mobile SDKs send "custom"; Lambda's Node.js documentation reads "Custom": both work.
function clientContext(value) {
  const parsed = parseHeaderJson(value);
  if (parsed && typeof parsed === 'object' && !('Custom' in parsed) && 'custom' in parsed) {
    Object.defineProperty(parsed, 'Custom', { value: parsed.custom, enumerable: false });
  }
  return parsed;
}

function makeContext(inv, headers) {
  const deadline = Number(headers['lambda-runtime-deadline-ms']) || 0;
  const context = {
    callbackWaitsForEmptyEventLoop: true,
    functionVersion: FUNCTION_VERSION,
    functionName: FUNCTION_NAME,
    memoryLimitInMB: MEMORY_SIZE,
    logGroupName: LOG_GROUP,
    logStreamName: LOG_STREAM,
    clientContext: clientContext(headers['lambda-runtime-client-context']),
    identity: parseHeaderJson(headers['lambda-runtime-cognito-identity']),
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    awsRequestId: inv.id,
    getRemainingTimeInMillis: () => Math.max(deadline - Date.now(), 0),
    // Legacy API: respond at once, without waiting for the event loop.
    succeed: (result) => finish(inv, null, result),
    fail: (err) => finish(inv, err === undefined || err === null ? 'handled' : err, undefined),
    done: (err, result) => finish(inv, err, result),
  };
  return context;
}

function next() {
  request(NEXT, onNext);
}

function onNext(status, headers, body) {
  if (status !== 200) {
    logError('impuls runtime: GET /invocation/next answered HTTP ' + status + ', exiting');
    process.exit(1);
  }
  const id = headers['lambda-runtime-aws-request-id'] || '';
  const inv = new Invocation(id);
  traceId = headers['lambda-runtime-trace-id'] || undefined;
  let event;
  try {
    event = JSON.parse(body.toString());
  } catch (err) {
    finish(inv, fault('Runtime.UnmarshalError', 'Unable to unmarshal input: ' + err.message),
      undefined);
    return;
  }
  current = inv;
  const context = makeContext(inv, headers);
  if (handler[HANDLER_STREAMING] === STREAM_RESPONSE) {
    runStreaming(inv, event, context);
    return;
  }
  const callback = (err, result) => {
    if (inv.done || inv.called) return;
    inv.called = true;
    if (context.callbackWaitsForEmptyEventLoop) {
      inv.err = err;
      inv.result = result;
      waitForEmptyLoop(inv);
    } else {
      finish(inv, err, result);
    }
  };
  let ret;
  try {
    ret = handler(event, context, callback);
  } catch (err) {
    finish(inv, err, undefined);
    return;
  }
  if (ret !== null && (typeof ret === 'object' || typeof ret === 'function') &&
      typeof ret.then === 'function') {
    ret.then(
      (result) => finish(inv, null, result),
      (err) => finish(inv, err === undefined || err === null ? 'handled' : err, undefined),
    );
  } else {
    waitForEmptyLoop(inv);
  }
}

// Respond once nothing but our (unref'ed) socket keeps the event loop alive: see 'beforeExit'.
function waitForEmptyLoop(inv) {
  if (inv.done || inv.waiting) return;
  inv.waiting = true;
  if (sock !== null && refd) {
    sock.unref();
    refd = false;
  }
}

process.on('beforeExit', () => {
  const inv = current;
  if (inv !== null && inv.waiting && !inv.done) finish(inv, inv.err, inv.result);
});

function finish(inv, err, result) {
  if (inv.stream !== null) { // context.succeed/fail/done of a streaming handler
    streamSettled(inv, err === undefined ? null : err);
    return;
  }
  if (inv.done || crashing) return;
  inv.done = true;
  if (current === inv) current = null;
  const invocation = RUNTIME + '/invocation/' + inv.id;
  if (err !== null && err !== undefined) {
    const body = err && err.impulsBody ? err.impulsBody : errorBody(err);
    postError(invocation + '/error', body, next);
    return;
  }
  let json;
  try {
    json = JSON.stringify(result === undefined ? null : result);
  } catch (e) {
    postError(invocation + '/error', {
      errorType: 'Runtime.MarshalError',
      errorMessage: 'Unable to marshal response: ' + (e && e.message),
      stackTrace: [],
    }, next);
    return;
  }
  if (json === undefined) json = 'null'; // e.g. a function
  const data = 'POST ' + invocation + '/response' + RESPONSE_HEAD + 'Content-Length: ' +
    Buffer.byteLength(json) + '\r\n\r\n' + json;
  whenFlushed(() => request(data, onPosted));
}

function onPosted(status) {
  if (status < 200 || status > 299) {
    logError('impuls runtime: POST /invocation/response answered HTTP ' + status);
  }
  next();
}

// Errors outside a handler's own promise/callback: report them, then end the process.
function crash(label, body) {
  if (crashing) return;
  logError(label + ' ' + JSON.stringify(body));
  const exit = () => process.exit(129);
  let target = null;
  if (!initializing && current !== null && !current.done && current.stream !== null) {
    const inv = current; // a streaming invocation: its stream carries the error
    crashing = true;
    setTimeout(exit, 2000);
    if (streamEnd(inv, body) || !inv.posted) inv.onPosted = exit;
    else exit();
    return;
  }
  if (initializing) target = RUNTIME + '/init/error';
  else if (current !== null && !current.done) {
    current.done = true;
    target = RUNTIME + '/invocation/' + current.id + '/error';
  }
  crashing = true;
  if (target === null || pendingCb !== null) {
    exit();
    return;
  }
  setTimeout(exit, 2000);
  const type = String(body.errorType).replace(/[^\x20-\x7e]/g, '?');
  whenFlushed(() => post(target, JSON.stringify(body),
    'Lambda-Runtime-Function-Error-Type: ' + type + '\r\n', exit));
}

process.on('uncaughtException', (err) => {
  crash('Uncaught Exception', initializing ? loadError(err) : errorBody(err));
});

process.on('unhandledRejection', (reason) => {
  const message = reason === undefined || reason === null ? String(reason) :
    isErrorLike(reason) ? String(reason.name) + ': ' + String(reason.message) : String(reason);
  crash('Unhandled Promise Rejection', {
    errorType: 'Runtime.UnhandledPromiseRejection',
    errorMessage: message,
    stackTrace: isErrorLike(reason) ? stackLines(reason) : [],
  });
});

// ------------------------------------------------------------------------------------------
// Start

function initFailed(err) {
  if (crashing) return;
  const body = loadError(err);
  crashing = true;
  logError('Init Error ' + JSON.stringify(body));
  const type = String(body.errorType).replace(/[^\x20-\x7e]/g, '?');
  whenFlushed(() => post(RUNTIME + '/init/error', JSON.stringify(body),
    'Lambda-Runtime-Function-Error-Type: ' + type + '\r\n', () => process.exit(129)));
}

function start() {
  if (!api && !unixPath) {
    logError('impuls runtime: AWS_LAMBDA_RUNTIME_API is not set');
    process.exit(1);
  }
  const root = env.LAMBDA_TASK_ROOT || process.cwd();
  const fullName = env._HANDLER || '';
  const baseName = path.basename(fullName);
  const moduleRoot = fullName.slice(0, fullName.length - baseName.length);
  const dot = baseName.indexOf('.');
  let loaded;
  try {
    if (dot <= 0 || dot === baseName.length - 1) {
      throw fault('Runtime.MalformedHandlerName', "Bad handler '" + fullName + "'");
    }
    loaded = loadModule(root, moduleRoot + baseName.slice(0, dot));
  } catch (err) {
    initFailed(err);
    return;
  }
  const ready = (moduleObject) => {
    try {
      handler = resolveHandler(moduleObject, baseName.slice(dot + 1), fullName);
    } catch (err) {
      initFailed(err);
      return;
    }
    initializing = false;
    next();
  };
  if (loaded.esm) loaded.esm.then(ready, initFailed);
  else ready(loaded.exports);
}

start();
