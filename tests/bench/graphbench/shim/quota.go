package quota

import "errors"

var ErrQuotaNotSupported = errors.New("filesystem does not support, or has not enabled quotas")

type Quota struct{ Size uint64 }

type Control struct{}

func NewControl(string) (*Control, error) { return nil, ErrQuotaNotSupported }

func (*Control) SetQuota(string, Quota) error { return ErrQuotaNotSupported }

func (*Control) GetQuota(string, *Quota) error { return ErrQuotaNotSupported }
