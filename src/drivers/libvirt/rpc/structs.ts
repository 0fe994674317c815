// The structures of remote_protocol.x and qemu_protocol.x that qbackup's
// procedures carry, declared once with the codecs of xdr.ts, field by field
// in the order of the .x file (remote_nonnull_domain, remote_typed_param,
// remote_error, the *_args and *_ret of each procedure in procedures.ts).
//
// Invariants: every string and array carries the limit the .x file gives it,
// so a hostile reply cannot make us allocate beyond it; a typed parameter of
// an unknown type is a protocol error (its size cannot be known).

import * as C from './constants.js';
import { LibvirtProtocolError } from './errors.js';
import {
  xdrArray,
  xdrFixedOpaque,
  xdrInt,
  xdrOptional,
  xdrString,
  xdrStruct,
  type XdrType,
  type XdrValue,
} from './xdr.js';

/** remote_nonnull_string */
export const remoteString = xdrString(C.REMOTE_STRING_MAX);
/** remote_string: a string that may be NULL (undefined). */
export const remoteOptionalString = xdrOptional(remoteString);
/** remote_uuid */
export const remoteUuid = xdrFixedOpaque(C.VIR_UUID_BUFLEN);

/** remote_nonnull_domain: how every call names a domain. */
export const remoteDomain = xdrStruct({ name: remoteString, uuid: remoteUuid, id: xdrInt });
export type LibvirtDomainRef = XdrValue<typeof remoteDomain>;

/** remote_nonnull_network (only inside remote_error). */
export const remoteNetwork = xdrStruct({ name: remoteString, uuid: remoteUuid });

/** remote_nonnull_domain_checkpoint */
export const remoteCheckpoint = xdrStruct({ name: remoteString, dom: remoteDomain });
export type LibvirtCheckpointRef = XdrValue<typeof remoteCheckpoint>;

/** remote_error, as a reply with status VIR_NET_ERROR carries it. */
export const remoteError = xdrStruct({
  code: xdrInt,
  domain: xdrInt,
  message: remoteOptionalString,
  level: xdrInt,
  dom: xdrOptional(remoteDomain),
  str1: remoteOptionalString,
  str2: remoteOptionalString,
  str3: remoteOptionalString,
  int1: xdrInt,
  int2: xdrInt,
  net: xdrOptional(remoteNetwork),
});

/** virTypedParameter: a named value of one of seven types. 64-bit values are bigint. */
export type LibvirtTypedParam =
  | { field: string; type: 'int'; value: number }
  | { field: string; type: 'uint'; value: number }
  | { field: string; type: 'llong'; value: bigint }
  | { field: string; type: 'ullong'; value: bigint }
  | { field: string; type: 'double'; value: number }
  | { field: string; type: 'boolean'; value: boolean }
  | { field: string; type: 'string'; value: string };

/** remote_typed_param: the field name, then union remote_typed_param_value switch (int type). */
export const remoteTypedParam: XdrType<LibvirtTypedParam> = {
  encode(w, p) {
    w.string(p.field, C.REMOTE_STRING_MAX);
    switch (p.type) {
      case 'int':
        w.int(C.VIR_TYPED_PARAM_INT).int(p.value);
        return;
      case 'uint':
        w.int(C.VIR_TYPED_PARAM_UINT).uint(p.value);
        return;
      case 'llong':
        w.int(C.VIR_TYPED_PARAM_LLONG).hyper(p.value);
        return;
      case 'ullong':
        w.int(C.VIR_TYPED_PARAM_ULLONG).uhyper(p.value);
        return;
      case 'double':
        w.int(C.VIR_TYPED_PARAM_DOUBLE).double(p.value);
        return;
      case 'boolean':
        w.int(C.VIR_TYPED_PARAM_BOOLEAN).int(p.value ? 1 : 0);
        return;
      case 'string':
        w.int(C.VIR_TYPED_PARAM_STRING).string(p.value, C.REMOTE_STRING_MAX);
        return;
    }
  },
  decode(r) {
    const field = r.string(C.REMOTE_STRING_MAX);
    const type = r.int();
    switch (type) {
      case C.VIR_TYPED_PARAM_INT:
        return { field, type: 'int', value: r.int() };
      case C.VIR_TYPED_PARAM_UINT:
        return { field, type: 'uint', value: r.uint() };
      case C.VIR_TYPED_PARAM_LLONG:
        return { field, type: 'llong', value: r.hyper() };
      case C.VIR_TYPED_PARAM_ULLONG:
        return { field, type: 'ullong', value: r.uhyper() };
      case C.VIR_TYPED_PARAM_DOUBLE:
        return { field, type: 'double', value: r.double() };
      case C.VIR_TYPED_PARAM_BOOLEAN:
        // libvirt sends an int; anything but 0 is true, as in virTypedParameter.
        return { field, type: 'boolean', value: r.int() !== 0 };
      case C.VIR_TYPED_PARAM_STRING:
        return { field, type: 'string', value: r.string(C.REMOTE_STRING_MAX) };
      default:
        throw new LibvirtProtocolError('bad-xdr', `typed parameter "${field}" has unknown type ${type}`);
    }
  },
};

export function typedParams(max: number): XdrType<LibvirtTypedParam[]> {
  return xdrArray(remoteTypedParam, max, 'typed parameters');
}

/** Typed parameters as a plain record; 64-bit values become numbers when exact, else stay bigint. */
export function typedParamsRecord(params: readonly LibvirtTypedParam[]): Record<string, number | bigint | boolean | string> {
  const out: Record<string, number | bigint | boolean | string> = {};
  for (const p of params) {
    out[p.field] = typeof p.value === 'bigint' && p.value <= BigInt(Number.MAX_SAFE_INTEGER) && p.value >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(p.value) : p.value;
  }
  return out;
}
