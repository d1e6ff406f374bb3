// A real OAuth 2.0 authorization server for the sidecar's tests: panva oidc-provider, configured
// from one JSON file that tests/peers/oidc.py writes (path in argv[2] or $OIDC_PEER_CONFIG):
//   host, port (0: a free one), tls {cert, key, client_ca}, clients (oidc-provider metadata),
//   resources [{identifier, scope, access_token_ttl}], subject_issuers [{issuer, jwks}] (trusted
//   besides this provider for token exchange subject tokens), actor_signers [{issuers, jwks}].
// It serves HTTPS on 127.0.0.1 with the issuer https://127.0.0.1:<port>, asks every client for a
// certificate without requiring one (so tls_client_auth can see it), and prints `READY <port>`.
//
// Besides oidc-provider's own endpoints (/token, /jwks, /.well-known/openid-configuration):
//   urn:ietf:params:oauth:grant-type:token-exchange   RFC 8693 as a custom grant (tokenExchange)
//   GET  /_test/stats       {token_requests, tokens_issued, in_flight, issued_by_client,
//                            issued_by_grant_type, outage, held}
//   POST /_test/reset       zeroes the counters, ends an outage, releases held requests
//   POST /_test/outage      {"down": true, "status": 503, "retry_after": 1}: /token answers 503
//   POST /_test/hold        {"held": true}: /token requests wait (counted in in_flight) until
//                            {"held": false}
//   POST /_test/resource    {identifier, scope}: a resource indicator accepted from now on
//   POST /_test/user-token  {sub, client_id, resource, scope, claims, act, expires_in} ->
//                            {access_token, ...}: a human's JWT access token minted through the
//                            provider's own AccessToken model (sub = the user, client_id = the app)
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TT_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const TT_JWT = 'urn:ietf:params:oauth:token-type:jwt';
const SUBJECT_TOKEN_TYPES = new Set([TT_ACCESS_TOKEN, TT_JWT]);
const VERIFY_ALGS = ['ES256', 'ES384', 'RS256', 'PS256', 'EdDSA'];
const CLOCK_TOLERANCE = 15;

// Extra claims (`act`, test-supplied claims) per token, read back by extraTokenClaims.
const extraClaims = new WeakMap();

// oidc-provider keeps an InvalidGrant's reason out of the response; a test peer says it.
function invalidGrant(description) {
  const err = new errors.InvalidGrant();
  err.error_description = description;
  return err;
}

function loadConfig() {
  const path = process.argv[2] || process.env.OIDC_PEER_CONFIG;
  if (!path) throw new Error('oidc peer: config path expected in argv[2] or $OIDC_PEER_CONFIG');
  return JSON.parse(readFileSync(path, 'utf8'));
}

async function signingKeys() {
  const { privateKey, publicKey } = await jose.generateKeyPair('ES256', { extractable: true });
  const kid = `peer-${Date.now().toString(36)}`;
  const meta = { kid, alg: 'ES256', use: 'sig' };
  return {
    privateJwks: { keys: [{ ...(await jose.exportJWK(privateKey)), ...meta }] },
    publicJwks: { keys: [{ ...(await jose.exportJWK(publicKey)), ...meta }] },
  };
}

// ---- mTLS: the three helpers oidc-provider needs, checked against the client CA we load ----

function loadCertificates(path) {
  const pem = readFileSync(path, 'utf8');
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) || [];
  return blocks.map((block) => new X509Certificate(block));
}

function derToPem(raw) {
  const lines = raw.toString('base64').match(/.{1,64}/g).join('\n');
  return `-----BEGIN CERTIFICATE-----\n${lines}\n-----END CERTIFICATE-----\n`;
}

function peerCertificate(ctx) {
  const peer = ctx.socket?.getPeerCertificate?.(true);
  return peer?.raw ? peer : undefined;
}

function getCertificate(ctx) {
  const peer = peerCertificate(ctx);
  return peer ? derToPem(peer.raw) : undefined;
}

function withinValidity(cert, now = Date.now()) {
  return Date.parse(cert.validFrom) <= now && now <= Date.parse(cert.validTo);
}

function issuedBy(cert, issuer) {
  return cert.checkIssued(issuer) && cert.verify(issuer.publicKey) && withinValidity(issuer);
}

// The chain the client sent, leaf first; node links a self-signed root to itself, so stop there.
function presentedChain(peer) {
  const chain = [];
  for (let link = peer; link?.raw && chain.length < 5; link = link.issuerCertificate) {
    const cert = new X509Certificate(link.raw);
    if (chain.length && chain[chain.length - 1].fingerprint256 === cert.fingerprint256) break;
    chain.push(cert);
  }
  return chain;
}

function makeCertificateAuthorized(trustAnchors) {
  return function certificateAuthorized(ctx) {
    const peer = peerCertificate(ctx);
    if (!peer) return false;
    const chain = presentedChain(peer);
    if (!chain.length || !withinValidity(chain[0])) return false;
    for (let i = 0; i < chain.length; i += 1) {
      if (trustAnchors.some((anchor) => issuedBy(chain[i], anchor))) return true;
      const next = chain[i + 1];
      if (!next || !next.ca || !withinValidity(next) || !issuedBy(chain[i], next)) return false;
    }
    return false;
  };
}

function subjectAltNames(cert) {
  // node formats these as `URI:spiffe://..., DNS:example.org, IP Address:127.0.0.1`
  return (cert.subjectAltName || '').split(', ').filter(Boolean);
}

function rdnSet(dn, separator) {
  return dn.split(separator).map((part) => part.trim()).filter(Boolean).sort().join('\n');
}

function certificateSubjectMatches(ctx, property, expected) {
  const peer = peerCertificate(ctx);
  if (!peer) return false;
  const cert = new X509Certificate(peer.raw);
  const sans = subjectAltNames(cert);
  switch (property) {
    case 'tls_client_auth_san_uri': return sans.includes(`URI:${expected}`);
    case 'tls_client_auth_san_dns': return sans.includes(`DNS:${expected}`);
    case 'tls_client_auth_san_email': return sans.includes(`email:${expected}`);
    case 'tls_client_auth_san_ip': return sans.includes(`IP Address:${expected}`);
    // RFC 4514 strings list RDNs last-first; compare the attribute=value sets, not their order
    case 'tls_client_auth_subject_dn': return rdnSet(cert.subject, '\n') === rdnSet(expected, ',');
    default: return false;
  }
}

// ---- resources: RFC 8707 resource indicators -> JWT access tokens ----

function resourceTable(config) {
  return new Map((config.resources || []).map((r) => [r.identifier, r]));
}

function resourceServerInfo(resource) {
  return {
    scope: resource.scope,
    audience: resource.identifier,
    accessTokenFormat: 'jwt',
    accessTokenTTL: resource.access_token_ttl || 300,
    jwt: { sign: { alg: 'ES256' } },
  };
}

function tokenTTL(_ctx, token) {
  return token.resourceServer?.accessTokenTTL || 300;
}

function makeGetResourceServerInfo(resources) {
  return async function getResourceServerInfo(_ctx, indicator) {
    const resource = resources.get(indicator);
    if (!resource) throw new errors.InvalidTarget(`unknown resource ${indicator}`);
    return resourceServerInfo(resource);
  };
}

function resourceServerFor(provider, resources, indicator) {
  const resource = resources.get(indicator);
  if (!resource) throw new errors.InvalidTarget(`unknown resource ${indicator}`);
  return new provider.ResourceServer(indicator, resourceServerInfo(resource));
}

function allScopes(config) {
  return [...new Set((config.resources || []).flatMap((r) => r.scope.split(' ')))];
}

// ---- RFC 8693 token exchange ----

function present(params, name) {
  if (!params[name]) throw new errors.InvalidRequest(`missing required parameter '${name}'`);
  return params[name];
}

function exchangeTarget(params) {
  const { resource, audience } = params;
  if (resource && audience && resource !== audience) {
    throw new errors.InvalidTarget('resource and audience name different targets');
  }
  const target = resource || audience;
  if (!target) throw new errors.InvalidRequest("one of 'resource' or 'audience' is required");
  return target;
}

function trustedSubjectIssuers(provider, config, ownJwks) {
  const own = { issuer: provider.issuer, jwks: ownJwks, typ: 'at+jwt' };
  return [own, ...(config.subject_issuers || [])].map((entry) => ({
    ...entry, keys: jose.createLocalJWKSet(entry.jwks),
  }));
}

function unverifiedClaims(token, label) {
  try {
    return jose.decodeJwt(token);
  } catch {
    throw new errors.InvalidRequest(`${label} is not a JWT`);
  }
}

async function verifyJwt(token, keys, options, label) {
  try {
    const { payload } = await jose.jwtVerify(token, keys, {
      algorithms: VERIFY_ALGS, clockTolerance: CLOCK_TOLERANCE, ...options,
    });
    return payload;
  } catch (err) {
    throw invalidGrant(`${label} is invalid: ${err.code || err.message}`);
  }
}

async function verifySubjectToken(params, issuers) {
  const token = present(params, 'subject_token');
  const type = present(params, 'subject_token_type');
  if (!SUBJECT_TOKEN_TYPES.has(type)) {
    throw new errors.InvalidRequest(`unsupported subject_token_type ${type}`);
  }
  const { iss } = unverifiedClaims(token, 'subject_token');
  const entry = issuers.find((candidate) => candidate.issuer === iss);
  if (!entry) throw invalidGrant('subject_token issuer is not trusted');
  return verifyJwt(token, entry.keys, {
    issuer: entry.issuer, typ: entry.typ, requiredClaims: ['sub', 'exp'],
  }, 'subject_token');
}

function actorAudienceOk(aud, acceptable) {
  if (aud === undefined) return true;
  return (Array.isArray(aud) ? aud : [aud]).some((value) => acceptable.has(value));
}

async function verifyActorToken(ctx, params, signers) {
  if (!params.actor_token) {
    if (params.actor_token_type) {
      throw new errors.InvalidRequest('actor_token_type given without actor_token');
    }
    return undefined;
  }
  const type = present(params, 'actor_token_type');
  if (type !== TT_JWT) throw new errors.InvalidRequest(`unsupported actor_token_type ${type}`);
  const { iss } = unverifiedClaims(params.actor_token, 'actor_token');
  const signer = signers.find((s) => !s.issuers?.length || s.issuers.includes(iss));
  if (!signer) throw invalidGrant('actor_token issuer is not trusted');
  const payload = await verifyJwt(params.actor_token, signer.keys, {
    requiredClaims: ['iss', 'sub', 'exp'],
  }, 'actor_token');
  const acceptable = new Set([ctx.oidc.issuer, ctx.oidc.urlFor('token')]);
  if (!actorAudienceOk(payload.aud, acceptable)) {
    throw invalidGrant('actor_token audience must be this issuer or its token endpoint');
  }
  return payload;
}

function actClaim(subject, actor) {
  if (!actor) return subject.act ? { act: subject.act } : {};
  return { act: { sub: actor.sub, ...(subject.act ? { act: subject.act } : {}) } };
}

function exchangeScope(client, resourceServer, requested) {
  if (!requested) return undefined;
  const scopes = requested.split(' ').filter(Boolean);
  const allowed = new Set(client.scope ? client.scope.split(' ') : scopes);
  const refused = scopes.find((scope) => !allowed.has(scope));
  if (refused) throw new errors.InvalidScope('requested scope is not allowed', refused);
  return scopes.filter((scope) => resourceServer.scopes.has(scope)).join(' ') || undefined;
}

function bindCertificate(ctx, token) {
  if (!ctx.oidc.client.tlsClientCertificateBoundAccessTokens) return;
  const cert = getCertificate(ctx);
  if (!cert) throw invalidGrant('mutual TLS client certificate not provided');
  token.setThumbprint('x5t', cert);
}

function makeTokenExchange(provider, config, resources, ownJwks) {
  const issuers = trustedSubjectIssuers(provider, config, ownJwks);
  const signers = (config.actor_signers || []).map((signer) => ({
    ...signer, keys: jose.createLocalJWKSet(signer.jwks),
  }));
  return async function tokenExchange(ctx) {
    const { params, client } = ctx.oidc;
    if (params.requested_token_type && params.requested_token_type !== TT_ACCESS_TOKEN) {
      const type = params.requested_token_type;
      throw new errors.InvalidRequest(`unsupported requested_token_type ${type}`);
    }
    const resourceServer = resourceServerFor(provider, resources, exchangeTarget(params));
    const subject = await verifySubjectToken(params, issuers);
    const actor = await verifyActorToken(ctx, params, signers);
    const token = new provider.AccessToken({
      accountId: subject.sub,
      client,
      resourceServer,
      scope: exchangeScope(client, resourceServer, params.scope),
      gty: TOKEN_EXCHANGE,
    });
    bindCertificate(ctx, token);
    extraClaims.set(token, actClaim(subject, actor));
    ctx.oidc.entity('AccessToken', token);
    ctx.body = {
      access_token: await token.save(),
      issued_token_type: TT_ACCESS_TOKEN,
      token_type: token.tokenType,
      expires_in: token.expiration,
      ...(token.scope ? { scope: token.scope } : {}),
    };
  };
}

const EXCHANGE_PARAMS = [
  'subject_token', 'subject_token_type', 'actor_token', 'actor_token_type',
  'requested_token_type', 'resource', 'audience', 'scope',
];

// ---- test hooks: Koa middleware in front of the provider ----

function newStats() {
  return {
    token_requests: 0,
    tokens_issued: 0,
    in_flight: 0,
    issued_by_client: {},
    issued_by_grant_type: {},
  };
}

function newState() {
  return { stats: newStats(), outage: null, held: false, waiters: [] };
}

function release(state) {
  state.held = false;
  state.waiters.splice(0).forEach((resolve) => resolve());
}

async function readJson(ctx) {
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    throw new errors.InvalidRequest('body must be JSON');
  }
}

function bump(table, key) {
  if (key) table[key] = (table[key] || 0) + 1;
}

function recordOutcome(ctx, stats) {
  if (ctx.status !== 200) return;
  stats.tokens_issued += 1;
  bump(stats.issued_by_client, ctx.oidc?.client?.clientId);
  bump(stats.issued_by_grant_type, ctx.oidc?.params?.grant_type);
}

function refuseForOutage(ctx, outage) {
  ctx.status = outage.status;
  if (outage.retry_after !== undefined) ctx.set('Retry-After', String(outage.retry_after));
  ctx.set('Cache-Control', 'no-store');
  ctx.body = { error: 'temporarily_unavailable', error_description: 'simulated outage' };
}

async function gateTokenRequest(ctx, next, state) {
  const { stats } = state;
  stats.token_requests += 1;
  stats.in_flight += 1;
  try {
    if (state.held) await new Promise((resolve) => { state.waiters.push(resolve); });
    if (state.outage) return refuseForOutage(ctx, state.outage);
    await next();
    recordOutcome(ctx, stats);
  } finally {
    stats.in_flight -= 1;
  }
  return undefined;
}

async function mintUserToken(provider, resources, body) {
  if (!body.sub) throw new errors.InvalidRequest("missing 'sub'");
  const client = await provider.Client.find(body.client_id || 'web-app');
  if (!client) throw new errors.InvalidRequest(`unknown client_id ${body.client_id}`);
  const resourceServer = resourceServerFor(provider, resources, body.resource);
  const token = new provider.AccessToken({
    accountId: body.sub,
    client,
    resourceServer,
    scope: body.scope || undefined,
    gty: 'authorization_code',
    ...(body.expires_in ? { expiresIn: body.expires_in } : {}),
  });
  extraClaims.set(token, { ...(body.claims || {}), ...(body.act ? { act: body.act } : {}) });
  const accessToken = await token.save();
  return {
    access_token: accessToken,
    token_type: 'Bearer',
    expires_in: token.expiration,
    scope: token.scope,
  };
}

function errorBody(err) {
  return {
    error: err.error || 'invalid_request',
    error_description: err.error_description || err.message,
  };
}

function resetState(state) {
  state.stats = newStats();
  state.outage = null;
  release(state);
  return { ok: true };
}

function setOutage(state, body) {
  const { down, status = 503, retry_after: retryAfter } = body;
  state.outage = down ? { status: status || 503, retry_after: retryAfter ?? undefined } : null;
  return { outage: !!state.outage };
}

function setHold(state, body) {
  if (body.held) state.held = true; else release(state);
  return { held: state.held };
}

// `METHOD /path` -> (env, body) => response body; env = {provider, resources, state}
const TEST_ROUTES = {
  'GET /_test/stats': ({ state }) => ({ ...state.stats, outage: !!state.outage, held: state.held }),
  'POST /_test/reset': ({ state }) => resetState(state),
  'POST /_test/outage': ({ state }, body) => setOutage(state, body),
  'POST /_test/hold': ({ state }, body) => setHold(state, body),
  'POST /_test/user-token': ({ provider, resources }, body) => mintUserToken(provider, resources, body),
  'POST /_test/resource': ({ resources }, body) => addResource(resources, body),
};

// a resource server known from now on (an MCP server on a port chosen at start): {identifier, scope}
function addResource(resources, body) {
  if (!body.identifier || !body.scope) throw new errors.InvalidRequest('identifier and scope are required');
  resources.set(body.identifier, { identifier: body.identifier, scope: body.scope });
  return { identifier: body.identifier };
}

async function testRoute(ctx, env) {
  const handler = TEST_ROUTES[`${ctx.method} ${ctx.path}`];
  if (!handler) {
    ctx.status = 404;
    ctx.body = { error: 'not_found' };
    return;
  }
  try {
    ctx.body = await handler(env, ctx.method === 'POST' ? await readJson(ctx) : {});
  } catch (err) {
    ctx.status = err.status || 400;
    ctx.body = errorBody(err);
  }
}

function testHooks(env) {
  return async function testHooksMiddleware(ctx, next) {
    if (ctx.path.startsWith('/_test/')) return testRoute(ctx, env);
    if (ctx.path === '/token' && ctx.method === 'POST') return gateTokenRequest(ctx, next, env.state);
    return next();
  };
}

// ---- assembly ----

function providerConfiguration(config, keys, resources, trustAnchors) {
  return {
    clients: config.clients,
    jwks: keys.privateJwks,
    scopes: allScopes(config),
    clientAuthMethods: [
      'client_secret_basic', 'client_secret_post', 'private_key_jwt', 'tls_client_auth',
    ],
    clientDefaults: {
      grant_types: ['client_credentials'],
      response_types: [],
      id_token_signed_response_alg: 'ES256',
    },
    clockTolerance: CLOCK_TOLERANCE,
    ttl: { AccessToken: tokenTTL, ClientCredentials: tokenTTL },
    extraTokenClaims: async (_ctx, token) => extraClaims.get(token),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => undefined,
        useGrantedResource: async () => false,
        getResourceServerInfo: makeGetResourceServerInfo(resources),
      },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        tlsClientAuth: true,
        getCertificate,
        certificateAuthorized: makeCertificateAuthorized(trustAnchors),
        certificateSubjectMatches,
      },
    },
  };
}

function logServerErrors(provider) {
  provider.on('server_error', (_ctx, err) => console.error('oidc peer: server_error', err));
  provider.on('grant.error', (_ctx, err) => {
    const why = [err.error_description, err.error_detail].filter(Boolean).join(': ');
    console.error('oidc peer: grant.error', err.message, why);
  });
}

async function listen(server, host, port) {
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  return server.address().port;
}

async function main() {
  const config = loadConfig();
  const host = config.host || '127.0.0.1';
  const server = createServer({
    cert: readFileSync(config.tls.cert),
    key: readFileSync(config.tls.key),
    ca: readFileSync(config.tls.client_ca),
    requestCert: true,
    rejectUnauthorized: false,
  });
  const port = await listen(server, host, config.port || 0);
  const keys = await signingKeys();
  const resources = resourceTable(config);
  const provider = new Provider(
    `https://${host}:${port}`,
    providerConfiguration(config, keys, resources, loadCertificates(config.tls.client_ca)),
  );
  const tokenExchange = makeTokenExchange(provider, config, resources, keys.publicJwks);
  provider.registerGrantType(TOKEN_EXCHANGE, tokenExchange, EXCHANGE_PARAMS);
  provider.use(testHooks({ provider, resources, state: newState() }));
  logServerErrors(provider);
  server.on('request', provider.callback());
  process.on('SIGTERM', () => process.exit(0));
  console.log(`READY ${port}`);
}

main().catch((err) => {
  console.error('oidc peer: failed to start:', err);
  process.exit(1);
});
